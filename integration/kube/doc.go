// Package kube starts a real Kubernetes control plane for tests: Debian's
// etcd and a kube-apiserver built from the module proxy, both on loopback,
// with token authentication, RBAC authorization and a service-account issuer
// (so TokenRequest and TokenReview work). There is no kubelet, scheduler or
// controller-manager: tests create the objects they need (namespaces,
// service accounts, pods with spec.nodeName already set).
//
// In a test:
//
//	c := kube.Start(t, kube.Options{})          // skips when etcd/kube-apiserver are unavailable
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
//		if errors.Is(err, kube.ErrUnavailable) { fmt.Println("skip:", err); os.Exit(0) }
//		...
//		code := m.Run(); c.Close(); os.Exit(code)
//	}
//
// Binaries are found as follows. kube-apiserver: Options.APIServer, then
// $AMBIT_KUBE_APISERVER, then the cache that integration/apiserver/build.sh
// fills (${AMBIT_CACHE:-$XDG_CACHE_HOME/ambit}/kube-apiserver-<version>/), and
// when it is missing the harness runs build.sh (minutes, once). etcd:
// Options.Etcd, then $AMBIT_ETCD, then etcd on $PATH (apt-get install
// etcd-server). Only when a binary cannot be found or built does Start skip
// the test (New returns ErrUnavailable), with a message that says which one
// and how to get it.
//
// Each cluster uses its own temporary directory and free loopback ports, so
// several test binaries can run clusters side by side.
package kube
