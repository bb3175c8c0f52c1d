package model

import "testing"

func TestQUICAdvertised(t *testing.T) {
	on := map[string]string{LabelHBONEQUIC: "enabled"}
	off := map[string]string{LabelHBONEQUIC: "disabled"}
	for _, c := range []struct {
		ns, pod map[string]string
		want    bool
	}{
		{nil, nil, false},
		{on, nil, true},
		{nil, on, true},
		{on, off, false},
		{off, on, true},
	} {
		if got := QUICAdvertised(c.ns, c.pod); got != c.want {
			t.Errorf("QUICAdvertised(%v, %v) = %v, want %v", c.ns, c.pod, got, c.want)
		}
	}
}
