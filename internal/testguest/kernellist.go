package testguest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// kernelList reads one of the builders' kernel lists in the cache
// (kernels.txt, fix-kernels.txt, extra-kernels.txt): one "SERIES RELEASE"
// line per kernel. what names the list in errors, builder the script that
// writes it, and whenEmpty explains an empty list. With mustExist, a
// listed kernel whose vmlinuz is missing is an error.
func kernelList(cache, file, what, builder, whenEmpty string, mustExist bool) ([]Kernel, error) {
	path := filepath.Join(cache, file)
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("testguest: %s not built (run %s): %w", what, builder, err)
	}
	defer f.Close()
	var ks []Kernel
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 2 {
			continue
		}
		k := Kernel{Series: fields[0], Release: fields[1], Dir: filepath.Join(cache, "kernels", fields[1])}
		if mustExist {
			if _, err := os.Stat(k.Vmlinuz()); err != nil {
				return nil, fmt.Errorf("testguest: %s: %s listed but not built: %w", what, k.Release, err)
			}
		}
		ks = append(ks, k)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(ks) == 0 {
		return nil, fmt.Errorf("testguest: %s lists no kernel%s", path, whenEmpty)
	}
	return ks, nil
}
