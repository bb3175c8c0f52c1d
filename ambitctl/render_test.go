package ambitctl

import (
	"testing"

	"github.com/ambit-mesh/ambit/manifests"
)

func TestImageFor(t *testing.T) {
	rules := []manifests.Image{
		{Name: "ghcr.io/ambit-mesh/ambit", NewTag: "latest"},
		{Name: "ghcr.io/ambit-mesh/waypoint", NewName: "ghcr.io/other/waypoint", Digest: "sha256:abc"},
	}
	for _, tc := range []struct {
		image string
		img   images
		want  string
	}{
		{"ghcr.io/ambit-mesh/ambit", images{}, "ghcr.io/ambit-mesh/ambit:latest"},
		{"ghcr.io/ambit-mesh/ambit:old", images{}, "ghcr.io/ambit-mesh/ambit:latest"},
		{"ghcr.io/ambit-mesh/ambit:old", images{Tag: "1.0"}, "ghcr.io/ambit-mesh/ambit:1.0"},
		{"ghcr.io/ambit-mesh/ambit", images{Hub: "localhost:5000/me/", Tag: "dev"}, "localhost:5000/me/ambit:dev"},
		{"ghcr.io/ambit-mesh/waypoint:1", images{}, "ghcr.io/other/waypoint@sha256:abc"},
		{"ghcr.io/ambit-mesh/waypoint:1", images{Tag: "2"}, "ghcr.io/other/waypoint:2"},
		{"localhost:5000/x", images{}, "localhost:5000/x"},
		{"localhost:5000/x:3", images{Hub: "h"}, "h/x:3"},
	} {
		if got := imageFor(tc.image, rules, tc.img); got != tc.want {
			t.Errorf("imageFor(%q, %+v) = %q, want %q", tc.image, tc.img, got, tc.want)
		}
	}
}
