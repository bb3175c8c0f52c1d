package ambitctl

import (
	"context"
	"fmt"
	"runtime/debug"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Where the control plane runs (manifests/istiod-lite.yaml).
const (
	controlPlaneNamespace  = "ambit-system"
	controlPlaneDeployment = "istiod-lite"
)

// versionInfo is what version prints.
type versionInfo struct {
	Client       string `json:"clientVersion"`
	Revision     string `json:"revision,omitempty"`
	GoVersion    string `json:"goVersion,omitempty"`
	ControlPlane string `json:"controlPlaneVersion,omitempty"`
}

// clientVersion reads the module version and VCS stamp from build info.
func clientVersion() versionInfo {
	v := versionInfo{Client: "(devel)"}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if bi.Main.Version != "" {
		v.Client = bi.Main.Version
	}
	v.GoVersion = bi.GoVersion
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && modified == "true" {
		rev += "-dirty"
	}
	v.Revision = rev
	return v
}

func newVersionCommand(g *globalFlags) *cobra.Command {
	var remote bool
	var out outputFlag
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the client's and the control plane's versions",
		Long: `Version prints ambitctl's version (from its build information) and the
control plane's (the image tag of the istiod-lite Deployment in ambit-system).`,
		Example: `  ambitctl version
  ambitctl version --remote=false -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			v := clientVersion()
			var cpErr error
			if remote {
				v.ControlPlane, cpErr = g.controlPlaneVersion(cmd.Context())
			}
			if ok, err := out.structured(cmd.OutOrStdout(), v); ok {
				if err == nil {
					err = cpErr
				}
				return err
			}
			w := cmd.OutOrStdout()
			rev := ""
			if v.Revision != "" {
				rev = " (" + v.Revision + ")"
			}
			fmt.Fprintf(w, "client version: %s%s\n", v.Client, rev)
			if remote && cpErr == nil {
				fmt.Fprintf(w, "control plane version: %s\n", v.ControlPlane)
			}
			return cpErr
		},
	}
	cmd.Flags().BoolVar(&remote, "remote", true, "also ask the cluster for the control plane's version")
	out.register(cmd)
	return cmd
}

func (g *globalFlags) controlPlaneVersion(ctx context.Context) (string, error) {
	c, err := g.cluster()
	if err != nil {
		return "", err
	}
	d, err := c.kube.AppsV1().Deployments(controlPlaneNamespace).Get(ctx, controlPlaneDeployment, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return "", fmt.Errorf("control plane not installed: no Deployment %s/%s (install it: ambitctl install)", controlPlaneNamespace, controlPlaneDeployment)
	}
	if err != nil {
		return "", c.explain("get control plane version", err)
	}
	for _, ct := range d.Spec.Template.Spec.Containers {
		if ct.Name == controlPlaneDeployment {
			return imageTag(ct.Image), nil
		}
	}
	if cs := d.Spec.Template.Spec.Containers; len(cs) > 0 {
		return imageTag(cs[0].Image), nil
	}
	return "", fmt.Errorf("the control plane's Deployment %s/%s has no container", controlPlaneNamespace, controlPlaneDeployment)
}
