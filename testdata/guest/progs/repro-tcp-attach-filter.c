/* Reproducer for testdata/fixes/tcp-attach-filter.diff (CVE-2026-53236,
 * "tcp: restrict SO_ATTACH_FILTER to priv users").
 * An unprivileged process (uid 65534, no capabilities) attaches a classic BPF
 * filter to a TCP socket: the unfixed kernel accepts it, the fixed one
 * answers EPERM (CAP_NET_ADMIN is now required for TCP sockets).
 * Prints VULNERABLE or FIXED; anything else is a test error. */
#include <errno.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
	pid_t pid;
	int status;

	fflush(stdout);
	pid = fork();
	if (pid < 0) {
		printf("ERROR fork: %s\n", strerror(errno));
		return 2;
	}
	if (pid == 0) {
		struct sock_filter code[] = { BPF_STMT(BPF_RET | BPF_K, 0xffff) };
		struct sock_fprog prog = { .len = 1, .filter = code };
		int s;

		if (setgid(65534) < 0 || setuid(65534) < 0) {
			printf("ERROR dropping privileges: %s\n", strerror(errno));
			_exit(2);
		}
		s = socket(AF_INET, SOCK_STREAM, 0);
		if (s < 0) {
			printf("ERROR socket: %s\n", strerror(errno));
			_exit(2);
		}
		if (setsockopt(s, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) == 0) {
			puts("VULNERABLE");
			_exit(0);
		}
		if (errno == EPERM) {
			puts("FIXED");
			_exit(0);
		}
		printf("ERROR setsockopt(SO_ATTACH_FILTER): %s\n", strerror(errno));
		_exit(2);
	}
	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status))
		return 2;
	return WEXITSTATUS(status);
}
