package main

import (
	"fmt"
	"runtime/debug"

	"github.com/spf13/cobra"
)

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "ambitctl",
		Short: "Install and operate the ambit sidecar-free mesh",
		Long: `ambitctl installs and operates ambit, a sidecar-free service mesh.

Enroll a namespace with the label istio.io/dataplane-mode=ambient, deploy a
waypoint per service account for L7 features, and inspect what the mesh does.`,
		SilenceUsage: true,
	}
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print ambitctl's version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := "(devel)"
			if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
				v = bi.Main.Version
			}
			_, err := fmt.Fprintln(cmd.OutOrStdout(), "ambitctl", v)
			return err
		},
	})
	return root
}
