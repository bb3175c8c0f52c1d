package ambitctl

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/manifests"
)

// images chooses the images of the installation: Hub replaces the
// repository path before the image's last element, Tag its tag (and drops
// a digest). Both apply after the kustomization's own images transform.
type images struct {
	Hub string
	Tag string
}

// render returns the embedded installation, CRDs first, then Namespaces, then
// the rest in the kustomization's order, with the images transform applied.
func render(img images) ([]*unstructured.Unstructured, error) {
	k, err := manifests.Load()
	if err != nil {
		return nil, err
	}
	var crds, nss, rest []*unstructured.Unstructured
	for _, res := range k.Resources {
		b, err := manifests.FS.ReadFile(res)
		if err != nil {
			return nil, fmt.Errorf("manifests: %w", err)
		}
		objs, err := decodeUnstructured(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("manifests: %s: %w", res, err)
		}
		for _, o := range objs {
			if err := transformImages(o, k.Images, img); err != nil {
				return nil, fmt.Errorf("manifests: %s: %w", ref(o), err)
			}
			switch {
			case o.GetKind() == "CustomResourceDefinition":
				crds = append(crds, o)
			case o.GetKind() == "Namespace" && o.GetAPIVersion() == "v1":
				nss = append(nss, o)
			default:
				rest = append(rest, o)
			}
		}
	}
	return append(append(crds, nss...), rest...), nil
}

// decodeUnstructured reads a YAML stream into objects (List kinds expanded).
func decodeUnstructured(r io.Reader) ([]*unstructured.Unstructured, error) {
	rd := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var out []*unstructured.Unstructured
	for i := 0; ; i++ {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		var m map[string]any
		if err := yaml.Unmarshal(doc, &m); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.IsList() {
			l, err := u.ToList()
			if err != nil {
				return nil, fmt.Errorf("document %d: %w", i, err)
			}
			for j := range l.Items {
				out = append(out, &l.Items[j])
			}
			continue
		}
		if u.GetKind() == "" || u.GetAPIVersion() == "" || u.GetName() == "" {
			return nil, fmt.Errorf("document %d: apiVersion, kind and metadata.name are required", i)
		}
		out = append(out, u)
	}
}

// podSpecPaths are where pod specs live in the kinds that carry them.
var podSpecPaths = map[string][]string{
	"Pod":         {"spec"},
	"Deployment":  {"spec", "template", "spec"},
	"DaemonSet":   {"spec", "template", "spec"},
	"StatefulSet": {"spec", "template", "spec"},
	"ReplicaSet":  {"spec", "template", "spec"},
	"Job":         {"spec", "template", "spec"},
	"CronJob":     {"spec", "jobTemplate", "spec", "template", "spec"},
}

// transformImages runs the kustomization's images transform and then the
// --hub/--tag choice on every container of o.
func transformImages(o *unstructured.Unstructured, rules []manifests.Image, img images) error {
	p, ok := podSpecPaths[o.GetKind()]
	if !ok {
		return nil
	}
	for _, field := range []string{"initContainers", "containers"} {
		cs, found, err := unstructured.NestedSlice(o.Object, append(append([]string{}, p...), field)...)
		if err != nil {
			return err
		}
		if !found {
			continue
		}
		for _, c := range cs {
			cm, ok := c.(map[string]any)
			if !ok {
				continue
			}
			if s, ok := cm["image"].(string); ok {
				cm["image"] = imageFor(s, rules, img)
			}
		}
		if err := unstructured.SetNestedSlice(o.Object, cs, append(append([]string{}, p...), field)...); err != nil {
			return err
		}
	}
	return nil
}

// imageFor rewrites one image reference.
func imageFor(image string, rules []manifests.Image, img images) string {
	name, tag, digest := splitImage(image)
	for _, r := range rules {
		if r.Name != name {
			continue
		}
		if r.NewName != "" {
			name = r.NewName
		}
		if r.NewTag != "" {
			tag, digest = r.NewTag, ""
		}
		if r.Digest != "" {
			tag, digest = "", r.Digest
		}
		break
	}
	if img.Hub != "" {
		name = strings.TrimSuffix(img.Hub, "/") + "/" + path.Base(name)
	}
	if img.Tag != "" {
		tag, digest = img.Tag, ""
	}
	switch {
	case digest != "":
		return name + "@" + digest
	case tag != "":
		return name + ":" + tag
	}
	return name
}

// splitImage splits "registry:5000/repo/name:tag@sha256:..." into its name,
// tag and digest.
func splitImage(image string) (name, tag, digest string) {
	if i := strings.Index(image, "@"); i >= 0 {
		image, digest = image[:i], image[i+1:]
	}
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		image, tag = image[:i], image[i+1:]
	}
	return image, tag, digest
}

// imageTag returns the tag of an image reference ("" when it has none).
func imageTag(image string) string {
	_, tag, digest := splitImage(image)
	if tag == "" {
		return digest
	}
	return tag
}

// writeYAML prints objects as a YAML stream.
func writeYAML(w io.Writer, objs []*unstructured.Unstructured) error {
	for i, o := range objs {
		b, err := yaml.Marshal(o.Object)
		if err != nil {
			return fmt.Errorf("yaml: %s: %w", ref(o), err)
		}
		if i > 0 {
			if _, err := io.WriteString(w, "---\n"); err != nil {
				return err
			}
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}
