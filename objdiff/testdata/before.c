/* objdiff fixture: the file before the "fix" (gen.sh compiles it). */
extern int printk(const char *, ...);
extern void __might_sleep(const char *file, int line);

static int counter;
static const char *const names[] = {"zero", "one"};

static __attribute__((noinline)) int bump(int by)
{
	counter += by;
	return counter;
}

int checked(int x)
{
	return bump(x) + names[x & 1][0];
}

int sleeper(void)
{
	__might_sleep("fix.c", __LINE__);
	return counter;
}

int stable(int y)
{
	printk("stable %d\n", y);
	return bump(y);
}

