// Package integration holds ambit's end-to-end harness: a real kube-apiserver
// with etcd, simulated nodes in network namespaces, and the scenarios that
// prove the mesh works. The tests run as root with `make integration`.
package integration
