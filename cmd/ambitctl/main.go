// Command ambitctl installs and operates ambit, in the manner of istioctl.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ambitctl:", err)
		os.Exit(1)
	}
}
