// SPDX-License-Identifier: GPL-2.0
/* Test object for hvpatch's linker: a user-memory access with an exception-table fixup. */
#include <linux/module.h>
#include <linux/uaccess.h>

noinline int hvpt_getuser(int __user *p)
{
	int v;

	if (!user_access_begin(p, sizeof(*p)))
		return -EFAULT;
	unsafe_get_user(v, p, efault);
	user_access_end();
	return v;
efault:
	user_access_end();
	return -EFAULT;
}

MODULE_LICENSE("GPL");
