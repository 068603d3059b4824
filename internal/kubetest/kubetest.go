// Package kubetest starts a real etcd and kube-apiserver for the fleet
// tests (controller-runtime's envtest, offline), from the binaries `make
// k8s-tools` builds into a cache outside the repository
// (tools/k8s/build.sh), and installs hvpatch's CRDs from deploy/crds.
package kubetest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/hvpatch/hvpatch/fleet/api"
	"github.com/hvpatch/hvpatch/internal/testguest"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// KubeVersion is the kube-apiserver version tools/k8s builds.
const KubeVersion = "v1.37.2"

// Assets is the directory of kube-apiserver and etcd: KUBEBUILDER_ASSETS,
// else ~/.cache/hvpatch-tools/k8s-VERSION.
func Assets() string {
	if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "hvpatch-tools", "k8s-"+KubeVersion)
}

// Cluster is a running API server.
type Cluster struct {
	Config     *rest.Config
	Client     client.Client
	Kubeconfig string // a kubeconfig file for subprocesses (admin)
	env        *envtest.Environment
}

// Start runs etcd and kube-apiserver for the test and installs the CRDs;
// both stop at the test's cleanup. Without the binaries the test is
// skipped (make test builds them first: make k8s-tools).
func Start(t testing.TB) *Cluster {
	t.Helper()
	dir := Assets()
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Skipf("no %s in %s: make k8s-tools builds it (KUBEBUILDER_ASSETS overrides the directory)", b, dir)
		}
	}
	root, err := testguest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: dir,
		CRDDirectoryPaths:     []string{filepath.Join(root, "deploy", "crds")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme(),
	}
	api := env.ControlPlane.GetAPIServer()
	api.Configure().Set("endpoint-reconciler-type", "none")
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting etcd and kube-apiserver from %s: %v", dir, err)
	}
	t.Cleanup(func() { env.Stop() })
	c, err := client.New(cfg, client.Options{Scheme: scheme()})
	if err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := WriteKubeconfig(cfg, kc); err != nil {
		t.Fatal(err)
	}
	return &Cluster{Config: cfg, Client: c, Kubeconfig: kc, env: env}
}

// WriteKubeconfig writes cfg (client certificate or token) as a kubeconfig.
func WriteKubeconfig(cfg *rest.Config, path string) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["test"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "test"}
	kc.CurrentContext = "test"
	return clientcmd.WriteToFile(*kc, path)
}

func scheme() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := api.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}
