// Package bpf captures the TCP traffic of enrolled pods in the kernel and
// hands it to the node's ztunnel.
//
// Three TCX programs (capture.c, built with bpf2go; the generated Go and
// object files are committed) steer packets with bpf_sk_assign to ztunnel's
// listeners, keeping the original destination in the packet: outbound
// connections of a pod go to ztunnel's port 15001, connections to a pod's
// port 15008 go to ztunnel's 15008, any other connection to a pod goes to
// 15006. A Capture loads them, pins their links and maps in bpffs so that
// capture outlives the process (a ztunnel restart neither detaches capture
// nor lets traffic bypass it: without a listener, new connections are
// refused), and programs pods one by one (AddPod, RemovePod) or as a whole
// (Reconcile). Enrolled decides from Kubernetes labels which pods to capture.
package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -type pod capture capture.c -- -O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu
