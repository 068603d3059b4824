int demo2(void)
{
	return 42;
}
