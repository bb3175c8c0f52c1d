package analyzer

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/ambit-mesh/ambit/istiod-lite/translate"
)

// ReadFiles reads YAML files and directories (recursively: .yaml, .yml and
// .json files) with istiod-lite's decoder, the one the control plane's file
// mode uses, and adds the pod templates of Deployments, StatefulSets,
// DaemonSets, ReplicaSets, Jobs and CronJobs as Workloads.
func ReadFiles(paths ...string) (Input, error) {
	var in Input
	for _, root := range paths {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				return nil
			}
			if p != root {
				switch filepath.Ext(p) {
				case ".yaml", ".yml", ".json":
				default:
					return nil
				}
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			objs, _, err := translate.Decode(bytes.NewReader(b))
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			in.Add(objs...)
			ws, err := templates(b)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			in.Workloads = append(in.Workloads, ws...)
			return nil
		})
		if err != nil {
			return in, fmt.Errorf("read %w", err)
		}
	}
	return in, nil
}

// templates returns the pod templates of the controllers in a YAML stream.
func templates(b []byte) ([]Workload, error) {
	type template struct {
		Metadata struct {
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
	}
	var ws []Workload
	rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	for {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return ws, nil
		}
		if err != nil {
			return nil, err
		}
		var o struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
			Spec struct {
				Template    template `json:"template"`
				JobTemplate struct {
					Spec struct {
						Template template `json:"template"`
					} `json:"spec"`
				} `json:"jobTemplate"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal(doc, &o); err != nil {
			return nil, err
		}
		var l map[string]string
		switch o.Kind {
		case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job":
			l = o.Spec.Template.Metadata.Labels
		case "CronJob":
			l = o.Spec.JobTemplate.Spec.Template.Metadata.Labels
		default:
			continue
		}
		ns := o.Metadata.Namespace
		if ns == "" {
			ns = "default"
		}
		ws = append(ws, Workload{Kind: o.Kind, Namespace: ns, Name: o.Metadata.Name, Labels: l})
	}
}
