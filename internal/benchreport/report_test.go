package benchreport

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func us(v ...int) []time.Duration {
	var d []time.Duration
	for _, x := range v {
		d = append(d, time.Duration(x)*time.Microsecond)
	}
	return d
}

func TestSummarize(t *testing.T) {
	s := Summarize(us(5, 1, 4, 2, 3))
	if s.N != 5 || s.Min != 1*time.Microsecond || s.Median != 3*time.Microsecond || s.Max != 5*time.Microsecond || s.P99 != 5*time.Microsecond {
		t.Fatalf("%+v", s)
	}
	if s := Summarize(us(1, 2, 3, 10)); s.Median != 2500*time.Nanosecond {
		t.Fatalf("even median %v", s.Median)
	}
	var hundred []time.Duration
	for i := 1; i <= 100; i++ {
		hundred = append(hundred, time.Duration(i))
	}
	if s := Summarize(hundred); s.P99 != 99 || s.P90 != 90 {
		t.Fatalf("p90 %v p99 %v", s.P90, s.P99)
	}
	if s := Summarize(nil); s.N != 0 {
		t.Fatal("empty")
	}
}

func TestReportRatiosAndOutput(t *testing.T) {
	r := &Report{Date: time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC), Mode: "short", Machine: map[string]string{"cores": "2"}}
	top := r.Topic("Freeze window", "one freeze + thaw")
	top.Add("ptrace", us(50, 60, 70), "libvirt suspend/resume", "")
	top.Add("libvirt suspend/resume", us(5000, 6000, 7000), "", "")
	r.Finish()
	row, ok := r.Row("Freeze window", "ptrace")
	if !ok || row.Ratio != 100 {
		t.Fatalf("ratio %v", row.Ratio)
	}
	var md, js bytes.Buffer
	if err := r.WriteMarkdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## Freeze window", "| ptrace | 3 | 60 µs |", "100× vs libvirt suspend/resume", "| cores | 2 |"} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("markdown lacks %q:\n%s", want, md.String())
		}
	}
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || back.Topics[0].Rows[0].Stats.Median != 60*time.Microsecond {
		t.Fatalf("json round trip: %v %+v", err, back)
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		512: "512 ns", 77 * time.Microsecond: "77 µs", 5800 * time.Microsecond: "5.8 ms", 1500 * time.Millisecond: "1.5 s",
	} {
		if got := FormatDuration(d); got != want {
			t.Errorf("%d: %q want %q", d, got, want)
		}
	}
}

func TestMachineFacts(t *testing.T) {
	m := MachineFacts()
	if m["cores"] == "" || m["cpu"] == "" || !strings.HasSuffix(m["memory"], "GiB") {
		t.Fatalf("%v", m)
	}
}
