package ambitctl

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
)

// istiodSelector selects istiod-lite's pods (manifests/istiod-lite.yaml).
const istiodSelector = "app=istiod-lite"

// The JSON of istiod-lite's /debug/proxy-status (istiod-lite/xds/status.go).
type (
	psDoc struct {
		Resources map[string]int        `json:"resources"`
		Waypoints map[string]psWaypoint `json:"waypoints"`
		Streams   []psStream            `json:"streams"`
	}
	psWaypoint struct {
		Version      string         `json:"version,omitempty"`
		Resources    map[string]int `json:"resources,omitempty"`
		Error        string         `json:"error,omitempty"`
		ErrorVersion string         `json:"errorVersion,omitempty"`
		Failures     int            `json:"failures"`
		Streams      int            `json:"streams"`
	}
	psStream struct {
		ID        int64                    `json:"id"`
		Kind      string                   `json:"kind,omitempty"`
		Node      string                   `json:"node"`
		Caller    string                   `json:"caller,omitempty"`
		Waypoint  string                   `json:"waypoint,omitempty"`
		ProxyID   string                   `json:"proxyId,omitempty"`
		Peer      string                   `json:"peer,omitempty"`
		Connected string                   `json:"connected"`
		Types     map[string]*psTypeStatus `json:"types"`
		Sync      map[string]string        `json:"sync"`
	}
	psTypeStatus struct {
		SentVersion  string `json:"sentVersion"`
		SentNonce    string `json:"sentNonce"`
		SentCount    int    `json:"sentResources"`
		AckedVersion string `json:"ackedVersion,omitempty"`
		AckedNonce   string `json:"ackedNonce,omitempty"`
		NackedNonce  string `json:"nackedNonce,omitempty"`
		NackError    string `json:"nackError,omitempty"`
		Responses    int    `json:"responses"`
		ACKs         int    `json:"acks"`
		NACKs        int    `json:"nacks"`
	}
)

type proxyStatusFlags struct {
	address string
	out     outputFlag
}

func newProxyStatusCommand(g *globalFlags) *cobra.Command {
	f := &proxyStatusFlags{}
	cmd := &cobra.Command{
		Use:   "proxy-status",
		Short: "Show every proxy connected to istiod-lite and whether its config is in sync",
		Long: `proxy-status reads istiod-lite's admin API (/debug/proxy-status on
127.0.0.1:15014 in its pod): every connected ztunnel and waypoint, its kind
and node, and per config type the version istiod-lite sent, the version the
proxy ACKed, and the message of the last NACK (the proxy rejected the config
and keeps its previous one).

SYNCED: the last response is ACKed. STALE: a response is not answered yet.
NACKED: the proxy rejected the last response it answered.

In a cluster it port-forwards through the API server to an istiod-lite pod;
with --istiod-address it reads host:port directly (local mode).`,
		Example: `  ambitctl proxy-status

  # istiod-lite in local mode on this host
  ambitctl proxy-status --istiod-address 127.0.0.1:15014 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runProxyStatus(cmd.Context(), cmd.OutOrStdout(), g, f)
		},
	}
	cmd.Flags().StringVar(&f.address, "istiod-address", "", "istiod-lite's admin host:port, read directly without Kubernetes (default port 15014)")
	f.out.register(cmd)
	return cmd
}

func runProxyStatus(ctx context.Context, out io.Writer, g *globalFlags, f *proxyStatusFlags) error {
	if err := f.out.validate(); err != nil {
		return err
	}
	var a *admin
	var err error
	if f.address != "" {
		a, err = directAdmin(f.address)
	} else {
		var c *cluster
		if c, err = g.cluster(); err != nil {
			return err
		}
		p, perr := c.pickPod(ctx, "istiod-lite", controlPlaneNamespace, istiodSelector, "", "")
		if perr != nil {
			return perr
		}
		a, err = c.podAdmin(ctx, p, istiodAdminPort)
	}
	if err != nil {
		return err
	}
	defer a.close()
	a.what = "istiod-lite " + a.what
	var raw json.RawMessage
	if err := a.get(ctx, "/debug/proxy-status", &raw); err != nil {
		return err
	}
	if done, err := f.out.raw(out, raw); done {
		return err
	}
	var d psDoc
	if err := decode(a, "/debug/proxy-status", raw, &d); err != nil {
		return err
	}
	return printProxyStatus(out, d)
}

// shortType names a type URL by its message name ("Listener", "Address").
func shortType(url string) string {
	if i := strings.LastIndexAny(url, "./"); i >= 0 {
		return url[i+1:]
	}
	return url
}

func proxyName(s psStream) string {
	switch {
	case s.Caller != "":
		return s.Caller
	case s.ProxyID != "":
		return s.ProxyID
	case s.Node != "":
		return s.Node
	}
	return s.Peer
}

func printProxyStatus(out io.Writer, d psDoc) error {
	streams := slices.Clone(d.Streams)
	slices.SortFunc(streams, func(a, b psStream) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(proxyName(a), proxyName(b)), cmp.Compare(a.ID, b.ID))
	})
	rows := [][]string{}
	for _, s := range streams {
		kind := s.Kind
		if kind == "" {
			kind = "unauthenticated"
		}
		node := s.Node
		if s.Waypoint != "" {
			node = s.ProxyID
		}
		for _, url := range slices.Sorted(maps.Keys(s.Types)) {
			t := s.Types[url]
			sync := s.Sync[url]
			nack := ""
			if t.NackError != "" {
				nack = oneLine(t.NackError)
			}
			rows = append(rows, []string{proxyName(s), kind, node, shortType(url), sync,
				t.SentVersion + " (" + strconv.Itoa(t.SentCount) + ")", t.AckedVersion, strconv.Itoa(t.NACKs), nack})
		}
		if len(s.Types) == 0 {
			rows = append(rows, []string{proxyName(s), kind, node, "", "NOT SENT", "", "", "0", ""})
		}
	}
	if err := printTable(out, []string{"PROXY", "KIND", "NODE", "TYPE", "SYNC", "SENT (RESOURCES)", "ACKED", "NACKS", "LAST NACK"}, rows); err != nil {
		return err
	}
	if len(d.Waypoints) == 0 {
		return nil
	}
	fmt.Fprintln(out)
	rows = [][]string{}
	for _, name := range slices.Sorted(maps.Keys(d.Waypoints)) {
		w := d.Waypoints[name]
		var res []string
		for _, url := range slices.Sorted(maps.Keys(w.Resources)) {
			res = append(res, fmt.Sprintf("%d %s", w.Resources[url], shortType(url)))
		}
		build := "OK"
		if w.Error != "" {
			build = "FAILED at " + w.ErrorVersion + ": " + oneLine(w.Error)
		}
		rows = append(rows, []string{name, w.Version, strings.Join(res, ", "), strconv.Itoa(w.Streams), build})
	}
	return printTable(out, []string{"WAYPOINT", "PUBLISHED", "RESOURCES", "STREAMS", "BUILD"}, rows)
}
