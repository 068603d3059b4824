/* A small object for kobj's tests: static and global functions and data,
 * strings in a mergeable section, one function per section.
 * Made with: gcc -O2 -c -ffunction-sections -fdata-sections -mcmodel=kernel -fno-pic sample.c */
static int counter;
int table[4] = {1, 2, 3, 4};
extern int printk(const char *, ...);

static __attribute__((noinline)) int bump(int by)
{
	counter += by;
	return counter;
}

int sample_entry(int x)
{
	printk("sample %d\n", x);
	return bump(x) + table[x & 3];
}
