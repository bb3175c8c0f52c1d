package ambitctl

import (
	"fmt"
	"path"
	"slices"
	"strings"

	jsonpatch "gopkg.in/evanphx/json-patch.v4"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/manifests"
)

// settings are install's --set options: each value selects a kustomize
// component of manifests/components (empty: the base as it is), applied to
// the rendered objects the way `kustomize build` applies it.
var settings = map[string]map[string]string{
	"identity": {"ca": "", "spire": "spire"},
}

// applySettings applies "key=value" settings to objs in place.
func applySettings(objs []*unstructured.Unstructured, sets []string) error {
	for _, s := range sets {
		key, val, _ := strings.Cut(s, "=")
		values, ok := settings[key]
		if !ok {
			return fmt.Errorf("--set %s: unknown setting %q (known: %s)", s, key, strings.Join(sortedKeys(settings), ", "))
		}
		comp, ok := values[val]
		if !ok {
			return fmt.Errorf("--set %s: %s is one of %s", s, key, strings.Join(sortedKeys(values), ", "))
		}
		if comp == "" {
			continue
		}
		if err := applyComponent(objs, comp); err != nil {
			return fmt.Errorf("--set %s: %w", s, err)
		}
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// component is the part of a kustomize Component that ambitctl implements:
// JSON 6902 patches from files, by target.
type component struct {
	Patches []struct {
		Path   string `json:"path"`
		Target struct {
			Group     string `json:"group"`
			Version   string `json:"version"`
			Kind      string `json:"kind"`
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"target"`
	} `json:"patches"`
}

// applyComponent applies the embedded component manifests/components/name
// to objs; every patch must match an object.
func applyComponent(objs []*unstructured.Unstructured, name string) error {
	dir := path.Join("components", name)
	b, err := manifests.FS.ReadFile(path.Join(dir, "kustomization.yaml"))
	if err != nil {
		return fmt.Errorf("component %s: %w", name, err)
	}
	var c component
	if err := yaml.Unmarshal(b, &c); err != nil {
		return fmt.Errorf("component %s: %w", name, err)
	}
	for _, p := range c.Patches {
		pb, err := manifests.FS.ReadFile(path.Join(dir, p.Path))
		if err != nil {
			return fmt.Errorf("component %s: %w", name, err)
		}
		pj, err := yaml.YAMLToJSON(pb)
		if err != nil {
			return fmt.Errorf("component %s: %s: %w", name, p.Path, err)
		}
		patch, err := jsonpatch.DecodePatch(pj)
		if err != nil {
			return fmt.Errorf("component %s: %s: %w", name, p.Path, err)
		}
		t := p.Target
		matched := 0
		for _, o := range objs {
			gv := o.GroupVersionKind()
			if gv.Kind != t.Kind || o.GetName() != t.Name || (t.Namespace != "" && o.GetNamespace() != t.Namespace) ||
				(t.Group != "" && gv.Group != t.Group) || (t.Version != "" && gv.Version != t.Version) {
				continue
			}
			j, err := o.MarshalJSON()
			if err != nil {
				return err
			}
			if j, err = patch.Apply(j); err != nil {
				return fmt.Errorf("component %s: %s on %s: %w", name, p.Path, ref(o), err)
			}
			if err := o.UnmarshalJSON(j); err != nil {
				return err
			}
			matched++
		}
		if matched == 0 {
			return fmt.Errorf("component %s: %s matches no object (%s %s/%s)", name, p.Path, t.Kind, t.Namespace, t.Name)
		}
	}
	return nil
}
