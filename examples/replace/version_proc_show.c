/*
 * A replacement for the guest kernel's fs/proc/version.c:version_proc_show,
 * the function behind /proc/version. It is compiled without kernel headers,
 * against a header of the guest's own types that hvpatch makes from the
 * guest's BTF (see docs/function-replacement.md), and linked by hvpatch
 * against the guest's own symbols, so the seq_printf it calls is the guest's.
 *
 * The kernel's function is
 *     static int version_proc_show(struct seq_file *m, void *v);
 * and the replacement keeps exactly that signature: the original's entry
 * jumps here with the caller's arguments and return address untouched.
 */

#ifdef HVPATCH_GUEST_H
/*
 * The guest's own types, from its BTF (the Makefile makes the header with
 *     hvpatch btf DOMAIN --type uts_namespace --type seq_file --type seq_printf -o guest.h
 * when REPLACE_GUEST or REPLACE_HEADER is set): struct uts_namespace with
 * its exact layout, and seq_printf's prototype as the kernel has it.
 * Global variables are not in a kernel's BTF: init_uts_ns is declared here.
 */
#include HVPATCH_GUEST_H
extern struct uts_namespace init_uts_ns;
#else
/* Without a guest header: declarations by hand. */

/* Only pointers to it are passed along, so it may stay opaque. */
struct seq_file;

/* The same prototype in 6.1 and 6.12 (include/linux/seq_file.h). */
extern void seq_printf(struct seq_file *m, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * The leading part of the kernel's struct uts_namespace: the name comes
 * first in 6.1 and 6.12, and these Debian kernels do not randomise struct
 * layout. Only what is read here is declared.
 */
#define HVPATCH_UTS_LEN 65
struct new_utsname {
	char sysname[HVPATCH_UTS_LEN];
	char nodename[HVPATCH_UTS_LEN];
	char release[HVPATCH_UTS_LEN];
	char version[HVPATCH_UTS_LEN];
	char machine[HVPATCH_UTS_LEN];
	char domainname[HVPATCH_UTS_LEN];
};
struct uts_namespace_head {
	struct new_utsname name;
};
extern struct uts_namespace_head init_uts_ns;
#endif

int hvpatch_version_proc_show(struct seq_file *m, void *v)
{
	(void)v;
	seq_printf(m, "%s version %s (version_proc_show replaced by hvpatch)\n",
		   init_uts_ns.name.sysname, init_uts_ns.name.release);
	return 0;
}
