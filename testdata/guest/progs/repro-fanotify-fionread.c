/* Reproducer for testdata/fixes/fanotify-fionread.diff
 * ("fanotify: report full event length for FIONREAD").
 * A fanotify group with FAN_REPORT_PIDFD queues one event whose record is
 * longer than the bare metadata (a pidfd info record follows). FIONREAD on
 * the unfixed kernel counts only the metadata, so it reports fewer bytes than
 * read() then returns; the fixed kernel reports the full length.
 * Prints VULNERABLE or FIXED; anything else is a test error. The file is
 * per process: the tests run copies on every vCPU at once. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/fanotify.h>
#include <sys/ioctl.h>
#include <unistd.h>

#ifndef FAN_REPORT_PIDFD
#define FAN_REPORT_PIDFD 0x00000080
#endif

int main(void)
{
	char buf[4096], path[64];
	int fan, fd, avail = -1, ret = 2;
	ssize_t n;

	snprintf(path, sizeof path, "/tmp/repro-fanotify.%d", (int)getpid());

	fd = open(path, O_CREAT | O_RDWR, 0600);
	if (fd < 0) {
		printf("ERROR create: %s\n", strerror(errno));
		return 2;
	}
	close(fd);
	fan = fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_PIDFD | FAN_NONBLOCK, O_RDONLY);
	if (fan < 0) {
		printf("ERROR fanotify_init: %s\n", strerror(errno));
		goto out;
	}
	if (fanotify_mark(fan, FAN_MARK_ADD, FAN_CLOSE_WRITE, AT_FDCWD, path) < 0) {
		printf("ERROR fanotify_mark: %s\n", strerror(errno));
		goto out;
	}
	fd = open(path, O_WRONLY);
	if (fd < 0) {
		printf("ERROR open: %s\n", strerror(errno));
		goto out;
	}
	close(fd); /* queues exactly one FAN_CLOSE_WRITE event */
	if (ioctl(fan, FIONREAD, &avail) < 0) {
		printf("ERROR FIONREAD: %s\n", strerror(errno));
		goto out;
	}
	n = read(fan, buf, sizeof buf);
	if (n <= 0) {
		printf("ERROR read: %s\n", n < 0 ? strerror(errno) : "no event");
		goto out;
	}
	if (n > (ssize_t)sizeof(struct fanotify_event_metadata)) {
		struct fanotify_event_metadata *m = (void *)buf;
		/* close the pidfd the event carries */
		struct fanotify_event_info_header *h = (void *)(buf + m->metadata_len);
		if (h->info_type == 4 /* FAN_EVENT_INFO_TYPE_PIDFD */)
			close(*(int *)(h + 1));
	}
	if (avail == n) {
		puts("FIXED");
		ret = 0;
	} else if (avail < n) {
		puts("VULNERABLE");
		ret = 0;
	} else {
		printf("ERROR FIONREAD %d, read %zd\n", avail, n);
	}
out:
	unlink(path);
	return ret;
}
