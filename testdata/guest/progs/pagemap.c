// pagemap PAGES MAX: touches PAGES fresh anonymous pages, then prints
// "VA PFN" (hex) for up to MAX present pages of its own address space, as
// /proc/self/pagemap reports them (PFNs need root), then "END", and stays
// alive so its page tables can be walked from the host and compared.
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: pagemap PAGES MAX\n");
		return 2;
	}
	long pages = atol(argv[1]), max = atol(argv[2]);
	long psz = sysconf(_SC_PAGESIZE);
	char *buf = mmap(NULL, pages * psz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (long i = 0; i < pages; i++)
		buf[i * psz] = (char)i;

	int pm = open("/proc/self/pagemap", O_RDONLY);
	FILE *maps = fopen("/proc/self/maps", "r");
	if (pm < 0 || !maps) {
		perror("/proc/self");
		return 1;
	}
	char line[512];
	long printed = 0;
	while (printed < max && fgets(line, sizeof line, maps)) {
		unsigned long start, end;
		if (sscanf(line, "%lx-%lx", &start, &end) != 2)
			continue;
		// Special mappings whose pages pagemap does not describe as RAM.
		if (strstr(line, "[vvar") || strstr(line, "[vsyscall]"))
			continue;
		for (unsigned long va = start; va < end && printed < max; va += psz) {
			uint64_t e;
			if (pread(pm, &e, sizeof e, (va / psz) * sizeof e) != sizeof e)
				break;
			if (!(e >> 63 & 1)) // not present
				continue;
			printf("%lx %llx\n", va, (unsigned long long)(e & ((1ULL << 55) - 1)));
			printed++;
		}
	}
	printf("END\n");
	fflush(stdout);
	for (;;)
		pause();
}
