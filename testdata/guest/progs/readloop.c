// readloop FILE SECONDS: reads FILE over and over for SECONDS and prints how
// many reads returned each distinct first line. Used to watch a patched
// function's effect from inside the guest while patches come and go.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_DISTINCT 8

int main(int argc, char **argv) {
	if (argc != 3) {
		fprintf(stderr, "usage: readloop FILE SECONDS\n");
		return 2;
	}
	double seconds = atof(argv[2]);
	char seen[MAX_DISTINCT][128];
	long counts[MAX_DISTINCT] = {0};
	int distinct = 0;
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &now);
		if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 > seconds)
			break;
		FILE *f = fopen(argv[1], "r");
		if (!f) {
			perror(argv[1]);
			return 1;
		}
		char line[128] = "";
		if (!fgets(line, sizeof line, f))
			line[0] = 0;
		fclose(f);
		line[strcspn(line, "\n")] = 0;
		int i;
		for (i = 0; i < distinct && strcmp(seen[i], line) != 0; i++)
			;
		if (i == distinct && distinct < MAX_DISTINCT)
			strcpy(seen[distinct++], line);
		if (i < MAX_DISTINCT)
			counts[i]++;
	}
	for (int i = 0; i < distinct; i++)
		printf("%ld\t%.60s\n", counts[i], seen[i]);
	return 0;
}
