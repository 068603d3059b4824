/* Reproducer for testdata/fixes/unix-siocatmark.diff (CVE-2026-52928,
 * "af_unix: Reject SIOCATMARK on non-stream sockets").
 * SIOCATMARK only makes sense for stream sockets (MSG_OOB). An unfixed kernel
 * answers it on a datagram socket too (returns 0); the fixed one fails with
 * EOPNOTSUPP. Prints VULNERABLE or FIXED; anything else is a test error. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

int main(void)
{
	int sv[2], answ = -1;

	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, sv) < 0) {
		printf("ERROR socketpair: %s\n", strerror(errno));
		return 2;
	}
	if (ioctl(sv[0], SIOCATMARK, &answ) == 0) {
		puts("VULNERABLE");
		return 0;
	}
	if (errno == EOPNOTSUPP) {
		puts("FIXED");
		return 0;
	}
	printf("ERROR ioctl(SIOCATMARK): %s\n", strerror(errno));
	return 2;
}
