package ambitctl

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sort"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
)

// globalFlags are the cluster-selection flags every command shares.
type globalFlags struct {
	kubeconfig string
	context    string
	namespace  string
}

func (g *globalFlags) register(root *cobra.Command) {
	pf := root.PersistentFlags()
	pf.StringVar(&g.kubeconfig, "kubeconfig", "", "path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	pf.StringVar(&g.context, "context", "", "the kubeconfig context to use")
	pf.StringVarP(&g.namespace, "namespace", "n", "", "the namespace (default: the context's namespace)")
	_ = root.RegisterFlagCompletionFunc("namespace", func(cmd *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
		return g.completeNamespaces(cmd)
	})
	_ = root.RegisterFlagCompletionFunc("context", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		cfg, err := g.clientConfig().RawConfig()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var names []string
		for n := range cfg.Contexts {
			names = append(names, n)
		}
		sort.Strings(names)
		return names, cobra.ShellCompDirectiveNoFileComp
	})
}

func (g *globalFlags) clientConfig() clientcmd.ClientConfig {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = g.kubeconfig
	overrides := &clientcmd.ConfigOverrides{CurrentContext: g.context}
	if g.namespace != "" {
		overrides.Context.Namespace = g.namespace
	}
	return clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
}

// cluster holds the clients of one API server.
type cluster struct {
	cfg       *rest.Config // for port-forwarding
	host      string
	namespace string // -n, else the context's, else "default"
	kube      kubernetes.Interface
	dyn       dynamic.Interface
	mapper    *restmapper.DeferredDiscoveryRESTMapper
}

// cluster connects (lazily: no request is made here) to the selected cluster.
func (g *globalFlags) cluster() (*cluster, error) {
	cc := g.clientConfig()
	cfg, err := cc.ClientConfig()
	if clientcmd.IsEmptyConfig(err) {
		return nil, fmt.Errorf("no cluster to talk to: no kubeconfig found (set --kubeconfig or $KUBECONFIG, or write ~/.kube/config)")
	}
	if err != nil {
		return nil, fmt.Errorf("no cluster to talk to: %w (set --kubeconfig, $KUBECONFIG or --context)", err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	cfg = rest.CopyConfig(cfg)
	cfg.QPS, cfg.Burst = 50, 100
	cfg.UserAgent = "ambitctl"
	cfg.WarningHandler = rest.NoWarnings{}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &cluster{
		cfg:       cfg,
		host:      cfg.Host,
		namespace: ns,
		kube:      kc,
		dyn:       dyn,
		mapper:    restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)),
	}, nil
}

// explain turns an API error into a sentence a person can act on. what
// names the operation ("get namespace demo").
func (c *cluster) explain(what string, err error) error {
	if err == nil {
		return nil
	}
	var ue *url.Error
	var oe *net.OpError
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: %w", what, err)
	case errors.As(err, &oe), errors.As(err, &ue) && !apierrors.IsTimeout(err):
		return fmt.Errorf("%s: cannot reach the API server at %s (is the cluster up and --context right?): %w", what, c.host, err)
	case apierrors.IsUnauthorized(err):
		return fmt.Errorf("%s: the API server rejected the credentials of this kubeconfig: %w", what, err)
	case apierrors.IsForbidden(err):
		return fmt.Errorf("%s: forbidden (ask for the RBAC permission): %w", what, err)
	case meta.IsNoMatchError(err):
		return fmt.Errorf("%s: the API server does not serve this kind; install ambit's CRDs (ambitctl install): %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// resource returns the client for obj's kind and namespace.
func (c *cluster) resource(gvk schema.GroupVersionKind, namespace string) (dynamic.ResourceInterface, *meta.RESTMapping, error) {
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return nil, nil, err
	}
	ri := c.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return ri.Namespace(namespace), m, nil
	}
	return ri, m, nil
}

// apply applies obj server-side as ambitctl (taking over conflicting fields:
// these objects are ambit's own).
func (c *cluster) apply(ctx context.Context, obj *unstructured.Unstructured) error {
	ri, _, err := c.resource(obj.GroupVersionKind(), obj.GetNamespace())
	if err != nil {
		return c.explain("apply "+ref(obj), err)
	}
	_, err = ri.Apply(ctx, obj.GetName(), obj, metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	return c.explain("apply "+ref(obj), err)
}

// ref names an object for people: "Kind namespace/name" or "Kind name".
func ref(obj interface {
	GetNamespace() string
	GetName() string
	GetObjectKind() schema.ObjectKind
}) string {
	kind := obj.GetObjectKind().GroupVersionKind().Kind
	if obj.GetNamespace() == "" {
		return kind + " " + obj.GetName()
	}
	return kind + " " + obj.GetNamespace() + "/" + obj.GetName()
}

func (g *globalFlags) completeNamespaces(cmd *cobra.Command) ([]string, cobra.ShellCompDirective) {
	c, err := g.cluster()
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	l, err := c.kube.CoreV1().Namespaces().List(cmd.Context(), metav1.ListOptions{})
	if err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	for _, ns := range l.Items {
		names = append(names, ns.Name)
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}
