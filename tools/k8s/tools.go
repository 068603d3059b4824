//go:build tools

// Package tools pins the test-only Kubernetes binaries (kube-apiserver and
// etcd) built by `make k8s-tools` into a cache outside the repository. This
// module is separate so hvpatch's own go.mod never carries k8s.io/kubernetes
// or its replace directives.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
