// SPDX-License-Identifier: GPL-2.0
/*
 * Test object for hvpatch's linker: one function per kind of special
 * section the kernel's own code carries (jump labels, alternatives,
 * BUG/WARN, exception table). Built as an external module against the
 * Debian headers; only the .o matters.
 */
#include <linux/module.h>
#include <linux/jump_label.h>
#include <linux/bug.h>
#include <linux/uaccess.h>
#include <asm/alternative.h>
#include <asm/cpufeature.h>

extern struct static_key_false hvpt_key_off;
extern struct static_key_true hvpt_key_on;
extern int hvpt_counter;

noinline int hvpt_branch_unlikely(int x)
{
	if (static_branch_unlikely(&hvpt_key_off))
		return x * 3 + hvpt_counter;
	return x + 1;
}

noinline int hvpt_branch_likely(int x)
{
	if (static_branch_likely(&hvpt_key_on))
		return x + 7;
	return x - hvpt_counter * 5;
}

extern volatile int hvpt_sink;

/* A long fall-through path: the assembler needs a 5-byte jmp for the site. */
noinline int hvpt_branch_far(int x)
{
	if (static_branch_unlikely(&hvpt_key_off))
		return x * 11;
	hvpt_sink = 1;
	hvpt_sink = 2;
	hvpt_sink = 3;
	hvpt_sink = 4;
	hvpt_sink = 5;
	hvpt_sink = 6;
	hvpt_sink = 7;
	hvpt_sink = 8;
	hvpt_sink = 9;
	hvpt_sink = 10;
	hvpt_sink = 11;
	hvpt_sink = 12;
	hvpt_sink = 13;
	hvpt_sink = 14;
	hvpt_sink = 15;
	hvpt_sink = 16;
	hvpt_sink = 17;
	hvpt_sink = 18;
	hvpt_sink = 19;
	hvpt_sink = 20;
	return x;
}

noinline void hvpt_alt(void)
{
	alternative("", "lfence", X86_FEATURE_LFENCE_RDTSC);
}

noinline int hvpt_cpu_has(int x)
{
	if (static_cpu_has(X86_FEATURE_HYPERVISOR))
		return x + 2;
	return x + hvpt_counter;
}

noinline int hvpt_warn(int x)
{
	WARN_ON(x > 100);
	return x + hvpt_counter;
}

noinline int hvpt_bug(int x)
{
	BUG_ON(x == 42);
	return x + hvpt_counter;
}

MODULE_LICENSE("GPL");
