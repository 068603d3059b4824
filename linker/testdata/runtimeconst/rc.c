/* Runtime constants as Linux 6.10+ emits them (asm/runtime-const.h):
 * gcc -O2 -c -mcmodel=kernel -fno-pic -fno-asynchronous-unwind-tables rc.c */
unsigned long rc_ptr(void)
{
	unsigned long r;
	asm("mov %1,%0\n1:\n"
	    ".pushsection runtime_ptr_USER_PTR_MAX,\"a\"\n\t"
	    ".long 1b - %c2 - .\n"
	    ".popsection" : "=r"(r) : "i"(0x0123456789abcdefUL), "i"(sizeof(long)));
	return r;
}

unsigned int rc_shift(unsigned int v)
{
	asm("shrl $12,%k0\n1:\n"
	    ".pushsection runtime_shift_d_hash_shift,\"a\"\n\t"
	    ".long 1b - 1 - .\n"
	    ".popsection" : "+r"(v));
	return v;
}
