package ksource

import (
	"strings"
	"testing"
)

func TestParseBanner(t *testing.T) {
	cases := []struct {
		banner string
		want   Build
	}{
		{
			"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)\n",
			Build{Release: "6.1.0-57-cloud-amd64", Series: "6.1", ABI: "6.1.0-57", Flavour: "cloud-amd64", Version: "6.1.192-3",
				Compiler: "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"},
		},
		{
			// The string as it sits in vmlinux: no build number after '#'.
			"Linux version 6.12.117+deb12-cloud-amd64 (debian-kernel@lists.debian.org) (x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) # SMP PREEMPT_DYNAMIC Debian 6.12.117-1~deb12u1 (2026-11-14)",
			Build{Release: "6.12.117+deb12-cloud-amd64", Series: "6.12", ABI: "6.12.117+deb12", Flavour: "cloud-amd64", Version: "6.12.117-1~deb12u1",
				Compiler: "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"},
		},
		{
			"Linux version 6.1.0-55-rt-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_RT Debian 6.1.190-1 (2026-10-02)",
			Build{Release: "6.1.0-55-rt-amd64", Series: "6.1", ABI: "6.1.0-55", Flavour: "rt-amd64", Version: "6.1.190-1",
				Compiler: "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"},
		},
	}
	for _, c := range cases {
		got, err := ParseBanner(c.banner)
		if err != nil {
			t.Errorf("ParseBanner(%q): %v", c.banner, err)
			continue
		}
		if got != c.want {
			t.Errorf("ParseBanner(%q)\n got  %+v\n want %+v", c.banner, got, c.want)
		}
	}
}

func TestParseBannerNotDebian(t *testing.T) {
	for _, b := range []string{
		"Linux version 6.8.0-45-generic (buildd@lcy02-amd64-075) (x86_64-linux-gnu-gcc-13 (Ubuntu 13.2.0-23ubuntu4) 13.2.0, GNU ld (GNU Binutils for Ubuntu) 2.42) #45-Ubuntu SMP PREEMPT_DYNAMIC Fri Aug 30 12:02:04 UTC 2024",
		"Linux version 6.9.0-rc1+ (me@box) (gcc (GCC) 14.1.1, GNU ld 2.42) #3 SMP Mon Apr 1 10:00:00 CEST 2024",
	} {
		_, err := ParseBanner(b)
		if err == nil || !strings.Contains(err.Error(), "--source") {
			t.Errorf("ParseBanner(%q) = %v, want an error pointing at --source", b, err)
		}
	}
	if _, err := ParseBanner("hello"); err == nil {
		t.Error("ParseBanner(hello) succeeded")
	}
}
