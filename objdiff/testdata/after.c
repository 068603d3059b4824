/* objdiff fixture: the file after the "fix": checked() gains a bounds
 * check, added() is new, sleeper() moves down (only __LINE__ changes). */
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
	if (x < 0 || x > 1)
		return -22;
	return bump(x) + names[x & 1][0];
}

int sleeper(void)
{
	/* moved down by the fix: only __LINE__ changes */


	__might_sleep("fix.c", __LINE__);
	return counter;
}

int stable(int y)
{
	printk("stable %d\n", y);
	return bump(y);
}

int added(int z)
{
	return checked(z) * 2;
}
