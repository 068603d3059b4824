// Package daemon is hvpatchd: it keeps declared patches applied to the
// guests beside it, serves hvpatch's API on a unix socket, and exports
// metrics.
package daemon

import (
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/hvpatch/hvpatch/hypervisor"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// Config is hvpatchd's configuration. Sources, weakest first: built-in
// defaults, the YAML file (configs/hvpatchd.yaml documents every key),
// HVPATCHD_* environment variables (HVPATCHD_API_SOCKET for api.socket),
// then command-line flags.
type Config struct {
	Libvirt struct {
		URI     string        `mapstructure:"uri"`
		Socket  string        `mapstructure:"socket"`
		Timeout time.Duration `mapstructure:"timeout"`
	} `mapstructure:"libvirt"`
	StateDir string `mapstructure:"state_dir"`
	PatchDir string `mapstructure:"patch_dir"`
	API      struct {
		Socket string `mapstructure:"socket"`
		Mode   string `mapstructure:"mode"`
		Owner  string `mapstructure:"owner"`
		Group  string `mapstructure:"group"`
		TCP    struct {
			Addr         string `mapstructure:"addr"`
			CertFile     string `mapstructure:"cert_file"`
			KeyFile      string `mapstructure:"key_file"`
			ClientCAFile string `mapstructure:"client_ca_file"`
		} `mapstructure:"tcp"`
	} `mapstructure:"api"`
	Metrics struct {
		Addr string `mapstructure:"addr"`
	} `mapstructure:"metrics"`
	Writer  string `mapstructure:"writer"`
	Signing struct {
		RequireSigned bool     `mapstructure:"require_signed"`
		TrustedKeys   []string `mapstructure:"trusted_keys"`
	} `mapstructure:"signing"`
	Reconcile struct {
		Interval   time.Duration `mapstructure:"interval"`
		MaxBackoff time.Duration `mapstructure:"max_backoff"`
	} `mapstructure:"reconcile"`
	Log struct {
		Format string `mapstructure:"format"`
		Level  string `mapstructure:"level"`
	} `mapstructure:"log"`
	// Kubernetes is the node-agent mode (daemon/kube.go, docs/fleet.md).
	Kubernetes struct {
		Enabled    bool          `mapstructure:"enabled"`
		Node       string        `mapstructure:"node"`
		Kubeconfig string        `mapstructure:"kubeconfig"`
		Domains    []string      `mapstructure:"domains"`
		Resync     time.Duration `mapstructure:"resync"`
	} `mapstructure:"kubernetes"`
}

// DefaultConfigFile is where hvpatchd looks when --config is not given.
const DefaultConfigFile = "/etc/hvpatch/hvpatchd.yaml"

func setDefaults(v *viper.Viper) {
	v.SetDefault("libvirt.uri", "qemu:///system")
	v.SetDefault("libvirt.socket", "/run/libvirt/libvirt-sock")
	v.SetDefault("libvirt.timeout", 10*time.Second)
	v.SetDefault("state_dir", "/var/lib/hvpatch")
	v.SetDefault("patch_dir", "/etc/hvpatch/patches")
	v.SetDefault("api.socket", "/run/hvpatch/hvpatchd.sock")
	v.SetDefault("api.mode", "0660")
	v.SetDefault("api.owner", "root")
	v.SetDefault("api.group", "root")
	v.SetDefault("api.tcp.addr", "")
	v.SetDefault("metrics.addr", "")
	v.SetDefault("writer", "auto")
	v.SetDefault("signing.require_signed", false)
	v.SetDefault("signing.trusted_keys", []string{"/etc/hvpatch/keys"})
	v.SetDefault("reconcile.interval", 30*time.Second)
	v.SetDefault("reconcile.max_backoff", 10*time.Minute)
	v.SetDefault("log.format", "text")
	v.SetDefault("log.level", "info")
	v.SetDefault("kubernetes.enabled", false)
	v.SetDefault("kubernetes.node", "")
	v.SetDefault("kubernetes.kubeconfig", "")
	v.SetDefault("kubernetes.domains", []string{})
	v.SetDefault("kubernetes.resync", 5*time.Minute)
}

// Flags declares the command-line overrides; LoadConfig reads them.
func Flags(fs *pflag.FlagSet) {
	fs.String("config", "", "configuration file (default "+DefaultConfigFile+" when it exists)")
	fs.String("state-dir", "", "journal and lock directory")
	fs.String("patch-dir", "", "directory of declared patch files")
	fs.String("api-socket", "", "unix socket for the API")
	fs.String("metrics-addr", "", "TCP address for Prometheus metrics (empty: only on the API socket)")
	fs.String("writer", "", "code writer: "+strings.Join(hypervisor.WriterNames, ", "))
	fs.String("log-format", "", "text or json")
	fs.String("log-level", "", "debug, info, warn, error")
	fs.Bool("require-signed", false, "refuse patches without a valid signature")
	fs.Bool("kubernetes", false, "run as the fleet's node agent: apply the HotPatch objects released to this node")
	fs.String("node-name", "", "Kubernetes node name of this host (--kubernetes)")
	fs.String("kubeconfig", "", "kubeconfig file (--kubernetes; empty: in-cluster)")
}

var flagKeys = map[string]string{
	"state-dir": "state_dir", "patch-dir": "patch_dir", "api-socket": "api.socket",
	"metrics-addr": "metrics.addr", "writer": "writer", "log-format": "log.format",
	"log-level": "log.level", "require-signed": "signing.require_signed",
	"kubernetes": "kubernetes.enabled", "node-name": "kubernetes.node", "kubeconfig": "kubernetes.kubeconfig",
}

// LoadConfig merges defaults, the file, the environment and the flags that
// were set, and validates the result.
func LoadConfig(fs *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	setDefaults(v)
	v.SetEnvPrefix("HVPATCHD")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	for flag, key := range flagKeys {
		if f := fs.Lookup(flag); f != nil && f.Changed {
			if err := v.BindPFlag(key, f); err != nil {
				return nil, err
			}
		}
	}
	path, _ := fs.GetString("config")
	explicit := path != ""
	if !explicit {
		path = DefaultConfigFile
	}
	v.SetConfigFile(path)
	v.SetConfigType("yaml")
	if err := v.ReadInConfig(); err != nil {
		if explicit || !os.IsNotExist(unwrapPathError(err)) {
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	var cfg Config
	hook := viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(durationHook, mapstructure.StringToSliceHookFunc(",")))
	if err := v.UnmarshalExact(&cfg, hook); err != nil {
		return nil, fmt.Errorf("configuration %s: %w", path, err)
	}
	return &cfg, cfg.Validate()
}

// durationHook decodes durations strictly: a string with units ("30s",
// "10m"); a bare number is refused (interval: 30 once meant 30 ns).
func durationHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(time.Duration(0)) || from == to {
		return data, nil
	}
	if from.Kind() != reflect.String {
		return nil, fmt.Errorf("duration %v needs a unit, e.g. \"%vs\" or \"%vm\"", data, data, data)
	}
	d, err := time.ParseDuration(data.(string))
	if err != nil {
		return nil, fmt.Errorf("duration %q: want a number with a unit, e.g. 30s, 10m (%w)", data, err)
	}
	return d, nil
}

// Minimums of the durations: below them the daemon would poll libvirtd or
// retry in a tight loop.
const (
	minInterval       = time.Second
	minLibvirtTimeout = 100 * time.Millisecond
)

func unwrapPathError(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// SocketMode parses api.mode (octal, e.g. "0660").
func (c *Config) SocketMode() (os.FileMode, error) {
	m, err := strconv.ParseUint(c.API.Mode, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("api.mode %q: want an octal permission such as 0660", c.API.Mode)
	}
	return os.FileMode(m), nil
}

// Validate reports the first setting that cannot work.
func (c *Config) Validate() error {
	if _, err := c.SocketMode(); err != nil {
		return err
	}
	w, err := hypervisor.ParseWriter(c.Writer)
	if err != nil {
		return fmt.Errorf("writer: %w", err)
	}
	c.Writer = w
	switch c.Log.Format {
	case "text", "json":
	default:
		return fmt.Errorf("log.format %q: want text or json", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level)
	}
	if c.API.Socket == "" || c.StateDir == "" || c.PatchDir == "" {
		return fmt.Errorf("api.socket, state_dir and patch_dir must be set")
	}
	tcp := c.API.TCP
	if tcp.Addr != "" && (tcp.CertFile == "" || tcp.KeyFile == "" || tcp.ClientCAFile == "") {
		return fmt.Errorf("api.tcp.addr %s needs cert_file, key_file and client_ca_file: the TCP API only serves clients with certificates", tcp.Addr)
	}
	if c.Reconcile.Interval < minInterval {
		return fmt.Errorf("reconcile.interval %v: want at least %v", c.Reconcile.Interval, minInterval)
	}
	if c.Reconcile.MaxBackoff < c.Reconcile.Interval {
		return fmt.Errorf("reconcile.max_backoff %v: want at least reconcile.interval (%v)", c.Reconcile.MaxBackoff, c.Reconcile.Interval)
	}
	if c.Kubernetes.Enabled && c.Kubernetes.Node == "" {
		return fmt.Errorf("kubernetes.enabled needs kubernetes.node (--node-name, or HVPATCHD_KUBERNETES_NODE from the pod's spec.nodeName)")
	}
	if c.Kubernetes.Enabled && c.Kubernetes.Resync < minInterval {
		return fmt.Errorf("kubernetes.resync %v: want at least %v", c.Kubernetes.Resync, minInterval)
	}
	if c.Libvirt.Timeout < minLibvirtTimeout {
		return fmt.Errorf("libvirt.timeout %v: want at least %v", c.Libvirt.Timeout, minLibvirtTimeout)
	}
	return nil
}
