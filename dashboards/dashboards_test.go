package dashboards

import (
	"encoding/json"
	"io/fs"
	"strings"
	"testing"
)

// Every dashboard is importable unchanged: valid JSON with a title and a
// unique uid, a Prometheus datasource variable that every panel and query
// uses, unique panel ids, a grid position, and at least one query each.
// (That every query returns data is integration/observability_test.go's.)
func TestDashboardsImportable(t *testing.T) {
	files, err := fs.Glob(FS, "*.json")
	if err != nil || len(files) < 3 {
		t.Fatalf("dashboards: %v %v", files, err)
	}
	uids := map[string]string{}
	for _, f := range files {
		b, err := fs.ReadFile(FS, f)
		if err != nil {
			t.Fatal(err)
		}
		var d struct {
			Title      string `json:"title"`
			UID        string `json:"uid"`
			Templating struct {
				List []struct {
					Name  string `json:"name"`
					Type  string `json:"type"`
					Query string `json:"query"`
				} `json:"list"`
			} `json:"templating"`
			Panels []struct {
				ID         int                 `json:"id"`
				Title      string              `json:"title"`
				Datasource map[string]string   `json:"datasource"`
				GridPos    *struct{ H, W int } `json:"gridPos"`
				Targets    []struct {
					RefID      string            `json:"refId"`
					Expr       string            `json:"expr"`
					Datasource map[string]string `json:"datasource"`
				} `json:"targets"`
			} `json:"panels"`
		}
		if err := json.Unmarshal(b, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if d.Title == "" || d.UID == "" {
			t.Errorf("%s: title %q uid %q", f, d.Title, d.UID)
		}
		if other, dup := uids[d.UID]; dup {
			t.Errorf("%s and %s share uid %q", f, other, d.UID)
		}
		uids[d.UID] = f
		hasDS := false
		for _, v := range d.Templating.List {
			hasDS = hasDS || (v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus")
		}
		if !hasDS {
			t.Errorf("%s: no Prometheus datasource variable", f)
		}
		ids := map[int]bool{}
		for _, p := range d.Panels {
			if ids[p.ID] || p.ID == 0 {
				t.Errorf("%s: panel %q: id %d missing or reused", f, p.Title, p.ID)
			}
			ids[p.ID] = true
			if p.GridPos == nil || p.GridPos.H == 0 || p.GridPos.W == 0 {
				t.Errorf("%s: panel %q: no grid position", f, p.Title)
			}
			if p.Datasource["uid"] != "${datasource}" {
				t.Errorf("%s: panel %q: datasource %v", f, p.Title, p.Datasource)
			}
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q: no query", f, p.Title)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" || tg.RefID == "" || refs[tg.RefID] || tg.Datasource["uid"] != "${datasource}" {
					t.Errorf("%s: panel %q: query %+v", f, p.Title, tg)
				}
				refs[tg.RefID] = true
			}
		}
	}
}
