/* Reproducer for testdata/fixes/ipc-next-id.diff (CVE-2026-52923,
 * "ipc: limit next_id allocation to the valid ID range").
 * With msg_next_id set, the unfixed kernel allocates the object index with no
 * upper bound: when the requested index (here the last valid one, 32767) is
 * taken, it hands out 32768, an index that does not fit the ID encoding. The
 * fixed kernel fails the msgget with ENOSPC.
 *
 * Runs in the initial IPC namespace on purpose: the stray object the unfixed
 * kernel creates cannot be removed (its ID maps to index 0), and tearing down a
 * namespace holding it would trip the WARN in ipc_rmid(). The stray object is
 * left alone; a second run still reports correctly (the unfixed kernel then
 * hands out 32769). Prints VULNERABLE or FIXED; anything else is a test error.
 *
 * msg_next_id is one knob for the whole namespace and the tests run copies of
 * this program on every vCPU at once: a copy takes an exclusive lock first, so
 * no other copy consumes the next_id it set. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <unistd.h>

#define LAST_IDX 32767 /* IPCMNI - 1 */

static int set_next_id(int id)
{
	char buf[32];
	int fd = open("/proc/sys/kernel/msg_next_id", O_WRONLY);
	int n = snprintf(buf, sizeof buf, "%d\n", id);

	if (fd < 0)
		return -1;
	if (write(fd, buf, n) != n) {
		close(fd);
		return -1;
	}
	return close(fd);
}

int main(void)
{
	int first, second;
	int lock = open("/tmp/repro-ipc-next-id.lock", O_RDWR | O_CREAT, 0600);

	if (lock < 0 || flock(lock, LOCK_EX) < 0) {
		printf("ERROR lock: %s\n", strerror(errno));
		return 2;
	}
	if (set_next_id(LAST_IDX) < 0) {
		printf("ERROR msg_next_id: %s\n", strerror(errno));
		return 2;
	}
	first = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
	if (first < 0) {
		printf("ERROR first msgget: %s\n", strerror(errno));
		return 2;
	}
	if ((first & 0x7fff) != LAST_IDX) {
		printf("ERROR first msgget gave id %d, not index %d\n", first, LAST_IDX);
		msgctl(first, IPC_RMID, NULL);
		return 2;
	}
	if (set_next_id(LAST_IDX) < 0) {
		printf("ERROR msg_next_id: %s\n", strerror(errno));
		msgctl(first, IPC_RMID, NULL);
		return 2;
	}
	second = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
	int err = errno;
	msgctl(first, IPC_RMID, NULL);
	if (second >= 0) {
		puts("VULNERABLE");
		return 0;
	}
	if (err == ENOSPC) {
		puts("FIXED");
		return 0;
	}
	printf("ERROR second msgget: %s\n", strerror(err));
	return 2;
}
