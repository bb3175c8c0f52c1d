// Package ambitctl is ambit's command line, in the manner of istioctl: cobra
// commands over client-go that install ambit from the manifests embedded in
// the binary (precheck before, check after), enroll namespaces, manage
// waypoints, analyze configuration, describe how the mesh treats a pod or
// service, and read the proxies' and istiod-lite's admin APIs
// (ztunnel-config, proxy-config, proxy-status) through a port-forward or
// directly. cmd/ambitctl is a thin main around Run; the pure analysis lives
// in ambitctl/analyzer, the image builder of `make images` in
// ambitctl/images.
package ambitctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
)

// FieldManager is the server-side apply field manager of everything
// ambitctl writes.
const FieldManager = "ambitctl"

// ExitError carries an exit code other than 1 (or a failure already
// reported, with a nil Err) from a command to Run.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// Run executes ambitctl with args (without the program name) and returns the
// process's exit code; errors are printed to stderr as one line.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := NewCommand()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	code := 1
	var ee *ExitError
	if errors.As(err, &ee) {
		code = ee.Code
		if ee.Err == nil {
			return code
		}
	}
	msg := oneLine(err.Error())
	if strings.HasPrefix(msg, "unknown command ") {
		msg += "; see ambitctl --help"
	}
	fmt.Fprintln(stderr, "ambitctl:", msg)
	return code
}

// oneLine keeps an error on one line (API errors sometimes hold newlines).
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// NewCommand returns ambitctl's root command with all its subcommands.
func NewCommand() *cobra.Command {
	g := &globalFlags{}
	root := &cobra.Command{
		Use:   "ambitctl",
		Short: "Install and operate the ambit sidecar-free mesh",
		Long: `ambitctl installs and operates ambit, a sidecar-free service mesh.

Enroll a namespace with the label istio.io/dataplane-mode=ambient, deploy a
waypoint per namespace or service account for L7 features, and analyze what
the mesh is told to do.`,
		Example: `  ambitctl precheck && ambitctl install && ambitctl check
  ambitctl enroll demo
  ambitctl waypoint apply -n demo --enroll-namespace --wait
  ambitctl analyze -A
  ambitctl describe pod reviews-v1-7d9f-x2 -n demo
  ambitctl proxy-status
  ambitctl ztunnel-config connections --node worker-1`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	g.register(root)
	root.AddCommand(
		newInstallCommand(g),
		newUninstallCommand(g),
		newEnrollCommand(g),
		newUnenrollCommand(g),
		newWaypointCommand(g),
		newVersionCommand(g),
		newAnalyzeCommand(g),
		newZtunnelConfigCommand(g),
		newFlowsCommand(g),
		newProxyConfigCommand(g),
		newProxyStatusCommand(g),
		newDescribeCommand(g),
		newPrecheckCommand(g),
		newCheckCommand(g),
	)
	root.CompletionOptions.HiddenDefaultCmd = false
	withUsageHints(root)
	return root
}

// withUsageHints makes cobra's own errors (a wrong flag, a wrong number of
// arguments) say which command they are about and where its help is.
func withUsageHints(root *cobra.Command) {
	// "install: " (Run prints "ambitctl: " before it)
	prefix := func(c *cobra.Command) string {
		if !c.HasParent() {
			return ""
		}
		return strings.TrimPrefix(c.CommandPath(), root.Name()+" ") + ": "
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return fmt.Errorf("%s%w; see %s --help", prefix(c), err, c.CommandPath())
	})
	cmds := []*cobra.Command{root}
	for len(cmds) > 0 {
		c := cmds[0]
		cmds = append(cmds[1:], c.Commands()...)
		if c.Args == nil {
			continue
		}
		args := c.Args
		c.Args = func(cmd *cobra.Command, a []string) error {
			err := args(cmd, a)
			if err == nil || strings.Contains(err.Error(), "--help") {
				return err
			}
			return fmt.Errorf("%s%w (usage: %s); see %s --help", prefix(cmd), err,
				strings.TrimSuffix(cmd.UseLine(), " [flags]"), cmd.CommandPath())
		}
	}
}
