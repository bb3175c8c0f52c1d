// Package model is ambit's configuration model: the workloads, services and
// policies that istiod-lite builds from Kubernetes (or from a directory of the
// same YAML) and that ztunnels and waypoints consume. Values are immutable once
// published; a Store holds the current Snapshot and its lookup indexes and
// applies full replacements and incremental (Delta xDS) updates.
package model
