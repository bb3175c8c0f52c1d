// Command waypoint is ambit's optional L7 proxy for a namespace or service
// account: retries, timeouts, circuit breaking and HTTPRoute canary splits.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "-help") {
		fmt.Print(`waypoint: ambit's L7 proxy for a namespace or service account.

It terminates HBONE on 15008 with its own SPIFFE identity, applies Gateway API
HTTPRoutes (weighted canary splits), retries, timeouts, circuit breaking and L7
AuthorizationPolicy, and forwards to the destination's ztunnel over HBONE.

Usage: waypoint [flags]
`)
		return
	}
	fmt.Fprintln(os.Stderr, "waypoint: the L7 proxy is not built yet; it follows the ztunnel and istiod-lite work")
	os.Exit(1)
}
