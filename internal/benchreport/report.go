// Package benchreport turns timing samples into hvpatch's side-by-side
// performance report (bench/REPORT.md and bench/REPORT.json): per topic, each
// row's median and p99 and its ratio to a baseline measured in the same run.
package benchreport

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Stats summarises the samples of one measurement.
type Stats struct {
	N      int           `json:"n"`
	Min    time.Duration `json:"min_ns"`
	Median time.Duration `json:"median_ns"`
	P90    time.Duration `json:"p90_ns"`
	P99    time.Duration `json:"p99_ns"`
	Max    time.Duration `json:"max_ns"`
}

// Summarize computes Stats with nearest-rank percentiles. The input is not
// modified.
func Summarize(samples []time.Duration) Stats {
	if len(samples) == 0 {
		return Stats{}
	}
	s := append([]time.Duration(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Stats{N: len(s), Min: s[0], Median: med, P90: rank(0.90), P99: rank(0.99), Max: s[len(s)-1]}
}

// Row is one measured operation. Baseline names another row of the same
// topic; Ratio is baseline median / this median (>1: this one is faster).
type Row struct {
	Name     string  `json:"name"`
	Stats    Stats   `json:"stats"`
	Baseline string  `json:"baseline,omitempty"`
	Ratio    float64 `json:"ratio,omitempty"`
	Note     string  `json:"note,omitempty"`
}

// Topic is one table of the report.
type Topic struct {
	Name string `json:"name"`
	Unit string `json:"unit"` // what one sample is, e.g. "one freeze + thaw"
	Rows []Row  `json:"rows"`
}

// Add appends a row, computing its ratio against a baseline row already in
// the topic (or added later: Finish recomputes).
func (t *Topic) Add(name string, samples []time.Duration, baseline, note string) {
	t.Rows = append(t.Rows, Row{Name: name, Stats: Summarize(samples), Baseline: baseline, Note: note})
}

func (t *Topic) finish() {
	byName := map[string]Stats{}
	for _, r := range t.Rows {
		byName[r.Name] = r.Stats
	}
	for i, r := range t.Rows {
		if b, ok := byName[r.Baseline]; ok && r.Stats.Median > 0 {
			t.Rows[i].Ratio = float64(b.Median) / float64(r.Stats.Median)
		}
	}
}

// Target is a stated goal checked against the measured rows.
type Target struct {
	What   string `json:"what"`
	Met    bool   `json:"met"`
	Detail string `json:"detail"`
	// VsBaseline is the measured value against its baseline measured in
	// the same run (e.g. "58× shorter than libvirt suspend/resume").
	VsBaseline string `json:"vs_baseline,omitempty"`
}

// Table is a table of values that are not durations (memory, CPU use).
type Table struct {
	Name    string     `json:"name"`
	About   string     `json:"about"`
	Columns []string   `json:"columns"`
	Rows    [][]string `json:"rows"`
}

// Report is the whole document.
type Report struct {
	Date    time.Time         `json:"date"`
	Mode    string            `json:"mode"` // "full" or "short"
	Machine map[string]string `json:"machine"`
	Guests  []string          `json:"guests"`
	Notes   []string          `json:"notes"`
	Topics  []*Topic          `json:"topics"`
	Targets []Target          `json:"targets"`
	Tables  []*Table          `json:"tables,omitempty"`
}

// Topic returns the named topic, creating it.
func (r *Report) Topic(name, unit string) *Topic {
	for _, t := range r.Topics {
		if t.Name == name {
			return t
		}
	}
	t := &Topic{Name: name, Unit: unit}
	r.Topics = append(r.Topics, t)
	return t
}

// Row finds a row by topic and name.
func (r *Report) Row(topic, name string) (Row, bool) {
	for _, t := range r.Topics {
		if t.Name != topic {
			continue
		}
		for _, row := range t.Rows {
			if row.Name == name {
				return row, true
			}
		}
	}
	return Row{}, false
}

// Finish computes every ratio; call it before writing.
func (r *Report) Finish() {
	for _, t := range r.Topics {
		t.finish()
	}
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteMarkdown writes the report as a Markdown document.
func (r *Report) WriteMarkdown(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# hvpatch performance report\n\n")
	fmt.Fprintf(&b, "Generated %s by `make bench` (%s mode).\n\n", r.Date.UTC().Format("2006-01-02 15:04 MST"), r.Mode)
	keys := make([]string, 0, len(r.Machine))
	for k := range r.Machine {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.WriteString("| machine | |\n|---|---|\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "| %s | %s |\n", k, r.Machine[k])
	}
	if len(r.Guests) > 0 {
		b.WriteString("\nGuests: " + strings.Join(r.Guests, "; ") + "\n")
	}
	for _, n := range r.Notes {
		b.WriteString("\n" + n + "\n")
	}
	if len(r.Targets) > 0 {
		b.WriteString("\n## Targets\n\n| target | met | measured | vs baseline (same run) |\n|---|---|---|---|\n")
		for _, t := range r.Targets {
			met := "no"
			if t.Met {
				met = "yes"
			}
			vs := t.VsBaseline
			if vs == "" {
				vs = "—"
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.What, met, t.Detail, vs)
		}
	}
	for _, t := range r.Topics {
		isBaseline := map[string]bool{}
		for _, row := range t.Rows {
			isBaseline[row.Baseline] = true
		}
		fmt.Fprintf(&b, "\n## %s\n\nOne sample: %s.\n\n", t.Name, t.Unit)
		b.WriteString("| operation | runs | median | p99 | min | vs baseline |\n|---|---:|---:|---:|---:|---|\n")
		for _, row := range t.Rows {
			ratio := "—"
			if isBaseline[row.Name] {
				ratio = "baseline"
			}
			if row.Baseline != "" {
				ratio = fmt.Sprintf("%s× vs %s", formatRatio(row.Ratio), row.Baseline)
			}
			name := row.Name
			if row.Note != "" {
				name += " (" + row.Note + ")"
			}
			fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %s |\n", name, row.Stats.N,
				FormatDuration(row.Stats.Median), FormatDuration(row.Stats.P99), FormatDuration(row.Stats.Min), ratio)
		}
	}
	for _, t := range r.Tables {
		fmt.Fprintf(&b, "\n## %s\n\n%s\n\n| %s |\n|%s\n", t.Name, t.About, strings.Join(t.Columns, " | "), strings.Repeat("---|", len(t.Columns)))
		for _, row := range t.Rows {
			fmt.Fprintf(&b, "| %s |\n", strings.Join(row, " | "))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func formatRatio(r float64) string {
	switch {
	case r == 0:
		return "?"
	case r >= 100:
		return fmt.Sprintf("%.0f", r)
	case r >= 10:
		return fmt.Sprintf("%.1f", r)
	default:
		return fmt.Sprintf("%.2f", r)
	}
}

// FormatDuration prints durations with three significant digits in the
// unit that suits them (ns, µs, ms, s).
func FormatDuration(d time.Duration) string {
	f := float64(d)
	switch {
	case d < time.Microsecond:
		return fmt.Sprintf("%.0f ns", f)
	case d < time.Millisecond:
		return fmt.Sprintf("%.3g µs", f/1e3)
	case d < time.Second:
		return fmt.Sprintf("%.3g ms", f/1e6)
	default:
		return fmt.Sprintf("%.3g s", f/1e9)
	}
}

// MachineFacts describes the host the report was measured on.
func MachineFacts() map[string]string {
	m := map[string]string{
		"cores":  fmt.Sprint(runtime.NumCPU()),
		"go":     runtime.Version(),
		"os":     runtime.GOOS + "/" + runtime.GOARCH,
		"memory": memTotal(),
		"cpu":    cpuModel(),
	}
	if out, err := exec.Command("uname", "-r").Output(); err == nil {
		m["host kernel"] = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		m["qemu"] = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	if out, err := exec.Command("libvirtd", "--version").Output(); err == nil {
		m["libvirt"] = strings.TrimSpace(string(out))
	}
	return m
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "model name") {
			if i := strings.IndexByte(line, ':'); i >= 0 {
				return strings.TrimSpace(line[i+1:])
			}
		}
	}
	return "unknown"
}

func memTotal() string {
	data, _ := os.ReadFile("/proc/meminfo")
	var kb int64
	for _, line := range strings.Split(string(data), "\n") {
		if _, err := fmt.Sscanf(line, "MemTotal: %d kB", &kb); err == nil {
			return fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}
