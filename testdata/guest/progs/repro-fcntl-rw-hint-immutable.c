/* Reproducer for testdata/fixes/fcntl-rw-hint-immutable.diff
 * ("fcntl: refuse F_SET_RW_HINT on an immutable inode").
 * On a private tmpfs, a file is made immutable (chattr +i through
 * FS_IOC_SETFLAGS) and opened read-only; setting a write-lifetime hint on it
 * changes the inode on an unfixed kernel and fails with EPERM on a fixed one.
 * Prints VULNERABLE or FIXED; anything else is a test error. The tmpfs is
 * per process: the tests run copies on every vCPU at once. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef F_SET_RW_HINT
#define F_SET_RW_HINT 1036
#endif
#ifndef RWH_WRITE_LIFE_SHORT
#define RWH_WRITE_LIFE_SHORT 2
#endif


static int setflags(int fd, int flags) { return ioctl(fd, FS_IOC_SETFLAGS, &flags); }

int main(void)
{
	uint64_t hint = RWH_WRITE_LIFE_SHORT;
	int fd, r, err, ret = 2;
	char dir[64], path[80];

	snprintf(dir, sizeof dir, "/tmp/repro-rw-hint.%d", (int)getpid());
	snprintf(path, sizeof path, "%s/f", dir);

	mkdir(dir, 0700);
	if (mount("tmpfs", dir, "tmpfs", 0, "size=64k") < 0) {
		printf("ERROR mount tmpfs: %s\n", strerror(errno));
		return 2;
	}
	fd = open(path, O_CREAT | O_RDWR, 0600);
	if (fd < 0 || setflags(fd, FS_IMMUTABLE_FL) < 0) {
		printf("ERROR making an immutable file: %s\n", strerror(errno));
		goto out;
	}
	close(fd);
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		printf("ERROR open: %s\n", strerror(errno));
		goto out;
	}
	r = fcntl(fd, F_SET_RW_HINT, &hint);
	err = errno;
	if (r == 0) {
		puts("VULNERABLE");
		ret = 0;
	} else if (err == EPERM) {
		puts("FIXED");
		ret = 0;
	} else {
		printf("ERROR fcntl(F_SET_RW_HINT): %s\n", strerror(err));
	}
	setflags(fd, 0);
	close(fd);
out:
	unlink(path);
	umount(dir);
	rmdir(dir);
	return ret;
}
