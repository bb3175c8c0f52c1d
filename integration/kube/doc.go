// Package kube starts a real Kubernetes control plane for tests: Debian's
// etcd and a kube-apiserver built from the module proxy, both on loopback,
// with token authentication, RBAC authorization and a service-account issuer
// (so TokenRequest and TokenReview work). By default there is no kubelet,
// scheduler or controller-manager: tests create the objects they need
// (namespaces, service accounts, pods with spec.nodeName already set).
//
// Options.ControllerManager and Options.Scheduler add kube-controller-manager
// and kube-scheduler (built like kube-apiserver), each with its own user and
// kubeconfig: Deployments then become ReplicaSets and pods, pods are bound to
// nodes, Services get EndpointSlices, namespaces their default service
// account and kube-root-ca.crt. Nodes come from kubelet.Kubelet with
// Register; their API (pods/exec, pods/portforward, pods/log) serves with
// KubeletTLS, which the API server's kubelet client certificate (from the
// same cluster CA) authenticates to.
//
// In a test:
//
//	c := kube.Start(t, kube.Options{})          // fails, saying how to get them, when etcd/kube-apiserver are missing
//	cs := c.Client()                            // kubernetes.Interface as cluster admin
//	cfg := c.Config()                           // *rest.Config (a copy) as cluster admin
//	tok, _ := c.ServiceAccountToken(ctx, "ns", "sa", []string{"istio-ca"}, "pod-name")
//	restricted := c.ConfigForToken(tok)         // talk to the API server as that caller
//	kubectl := exec.Command("kubectl", "--kubeconfig", c.Kubeconfig(), "get", "pods", "-A")
//
// Start registers t.Cleanup to stop the processes and delete their data,
// whether the test passes or fails; on failure it logs the tail of the
// API server's output. To share one cluster across a package's tests, use New
// in TestMain and Close it yourself:
//
//	func TestMain(m *testing.M) {
//		c, err := kube.New(context.Background(), kube.Options{})
//		if err != nil { fmt.Fprintln(os.Stderr, err); os.Exit(1) }
//		...
//		code := m.Run(); c.Close(); os.Exit(code)
//	}
//
// Binaries are found as follows. kube-apiserver: Options.APIServer, then
// $AMBIT_KUBE_APISERVER (likewise AMBIT_KUBE_CONTROLLER_MANAGER and
// AMBIT_KUBE_SCHEDULER), then the cache that integration/apiserver/build.sh
// fills (${AMBIT_CACHE:-$XDG_CACHE_HOME/ambit}/kube-apiserver-<version>/).
// The harness never builds it: a cold build takes longer than a test's
// timeout, and test binaries run in parallel. `make tools` builds it once,
// under a lock, before `make test`. etcd: Options.Etcd, then $AMBIT_ETCD,
// then etcd on $PATH (apt-get install etcd-server). When a binary is missing,
// New returns ErrUnavailable and Start fails the test with a message that
// says which one and how to get it.
//
// Each cluster uses its own temporary directory and free loopback ports, so
// several test binaries can run clusters side by side.
package kube
