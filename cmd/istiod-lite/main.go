// Command istiod-lite is ambit's control plane: it watches Kubernetes (or a
// directory of the same YAML), serves xDS to ztunnels and waypoints and signs
// workload certificates, all on 15012.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "-help") {
		fmt.Print(`istiod-lite: ambit's control plane.

It builds one model of workloads, services and policies from Kubernetes (or
from a directory of the same YAML objects in local mode), streams it to
ztunnels over Delta xDS, and signs SPIFFE workload certificates, all over TLS
on 15012.

Usage: istiod-lite [flags]
`)
		return
	}
	fmt.Fprintln(os.Stderr, "istiod-lite: the control plane is not built yet (issues: identity, istiod-lite)")
	os.Exit(1)
}
