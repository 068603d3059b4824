// A small stand-in for a kernel source file.
#include <linux/kernel.h>

static int demo_show(int x)
{
	int y = x * 2;

	return y + 1;
}

int demo_entry(int x)
{
	return demo_show(x);
}
