// Package manifests embeds ambit's installation, the YAML files of this
// directory, so that ambitctl carries them in its binary. Kustomization reads
// kustomization.yaml's resource list and image transforms; ambitctl applies
// them itself (it does not link kustomize).
package manifests

import (
	"embed"
	"fmt"

	"sigs.k8s.io/yaml"
)

// FS holds kustomization.yaml, the resources it lists, and the kustomize
// components of components/ (e.g. spire: SPIRE as the identity provider).
//
//go:embed kustomization.yaml *.yaml crds/*.yaml components/*/*.yaml
var FS embed.FS

// Kustomization is the part of kustomization.yaml that ambitctl implements:
// the resources, in order, and the images transform.
type Kustomization struct {
	Resources []string `json:"resources"`
	Images    []Image  `json:"images,omitempty"`
}

// Image is one entry of the kustomization's images transform: containers
// whose image name (without tag or digest) is Name get NewName, NewTag and
// Digest where those are set.
type Image struct {
	Name    string `json:"name"`
	NewName string `json:"newName,omitempty"`
	NewTag  string `json:"newTag,omitempty"`
	Digest  string `json:"digest,omitempty"`
}

// Load reads the embedded kustomization.yaml.
func Load() (Kustomization, error) {
	var k Kustomization
	b, err := FS.ReadFile("kustomization.yaml")
	if err != nil {
		return k, fmt.Errorf("manifests: %w", err)
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		return k, fmt.Errorf("manifests: kustomization.yaml: %w", err)
	}
	return k, nil
}
