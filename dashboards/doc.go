// Package dashboards holds ambit's Grafana dashboards (JSON, importable
// unchanged: Dashboards > Import, pick the Prometheus data source). Every
// panel's query is run against a real Prometheus scraping a mesh after
// traffic by integration/observability_test.go, and must return data.
package dashboards

import "embed"

// FS holds the dashboards, one JSON file each.
//
//go:embed *.json
var FS embed.FS
