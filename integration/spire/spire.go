// Package spire runs a real SPIRE for tests: spire-server (sqlite datastore,
// join_token node attestation) and spire-agents (join token, unix workload
// attestor with the binary's path, admin socket for the Delegated Identity
// API outside the Workload API socket's directory, authorized_delegates),
// as processes on this machine. The binaries come from build.sh (`make
// tools`), never built here.
package spire

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Version is the SPIRE release build.sh builds by default.
const Version = "v1.13.3"

// Binaries returns the paths of spire-server and spire-agent built by
// build.sh, or an error naming the command that builds them.
func Binaries() (server, agent string, err error) {
	cache := os.Getenv("AMBIT_CACHE")
	if cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			home, _ := os.UserHomeDir()
			base = filepath.Join(home, ".cache")
		}
		cache = filepath.Join(base, "ambit")
	}
	dir := filepath.Join(cache, "spire-"+Version)
	server, agent = filepath.Join(dir, "spire-server"), filepath.Join(dir, "spire-agent")
	for _, p := range []string{server, agent} {
		if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
			return "", "", fmt.Errorf("%s missing: run `make tools` (or integration/spire/build.sh) first", p)
		}
	}
	return server, agent, nil
}

// proc is a SPIRE process.
type proc struct {
	name, log string
	cmd       *exec.Cmd
	done      chan struct{}
	err       error // set before done closes
}

func start(name, dir, bin string, args ...string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, log: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

func (p *proc) tail(n int) string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitHealthy runs `bin healthcheck -socketPath sock` until it succeeds.
func waitHealthy(ctx context.Context, p *proc, bin, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var out []byte
	for {
		var err error
		out, err = exec.CommandContext(ctx, bin, "healthcheck", "-socketPath", sock).CombinedOutput()
		if err == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited: %v\n%s", p.name, p.err, p.tail(30))
		case <-ctx.Done():
			return fmt.Errorf("%s not healthy: %w (%s)\n%s", p.name, ctx.Err(), bytes.TrimSpace(out), p.tail(30))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ServerOptions configure a spire-server.
type ServerOptions struct {
	// Bin is spire-server (Binaries). Required.
	Bin string
	// Dir receives its config, data and log. Required.
	Dir string
	// TrustDomain (required).
	TrustDomain spiffeid.TrustDomain
	// CATTL is the lifetime of its CA (default 24h).
	CATTL time.Duration
}

// Server is a running spire-server on 127.0.0.1.
type Server struct {
	opts ServerOptions
	port int
	sock string
	p    *proc
}

// StartServer starts spire-server and waits until it is healthy.
func StartServer(ctx context.Context, o ServerOptions) (*Server, error) {
	if o.Bin == "" || o.Dir == "" || o.TrustDomain.IsZero() {
		return nil, errors.New("spire: server needs Bin, Dir and TrustDomain")
	}
	if o.CATTL == 0 {
		o.CATTL = 24 * time.Hour
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(o.Dir, "data"), 0o700); err != nil {
		return nil, err
	}
	s := &Server{opts: o, port: port, sock: filepath.Join(o.Dir, "server.sock")}
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = %d
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "DEBUG"
  ca_ttl = "%s"
  default_x509_svid_ttl = "1h"
  ca_key_type = "ec-p256"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, port, s.sock, o.TrustDomain.Name(), filepath.Join(o.Dir, "data"), o.CATTL, filepath.Join(o.Dir, "data", "datastore.sqlite3"))
	confPath := filepath.Join(o.Dir, "server.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	if s.p, err = start("spire-server", o.Dir, o.Bin, "run", "-config", confPath); err != nil {
		return nil, err
	}
	if err := waitHealthy(ctx, s.p, o.Bin, s.sock); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Port is the server's TCP port on 127.0.0.1.
func (s *Server) Port() int { return s.port }

// TrustDomain is the server's trust domain.
func (s *Server) TrustDomain() spiffeid.TrustDomain { return s.opts.TrustDomain }

// Log is the path of the server's log.
func (s *Server) Log() string { return s.p.log }

// cli runs a spire-server subcommand against the server's socket.
func (s *Server) cli(ctx context.Context, sub []string, args ...string) (string, error) {
	full := append(append(sub, "-socketPath", s.sock), args...)
	out, err := exec.CommandContext(ctx, s.opts.Bin, full...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("spire-server %s: %w: %s", strings.Join(full, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// JoinToken generates a join token; when alias is set, the agent that uses
// it is also alias (a node alias entry whose parent is the agent).
func (s *Server) JoinToken(ctx context.Context, alias spiffeid.ID) (string, error) {
	args := []string{"-ttl", "3600"}
	if !alias.IsZero() {
		args = append(args, "-spiffeID", alias.String())
	}
	out, err := s.cli(ctx, []string{"token", "generate"}, args...)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if tok, ok := strings.CutPrefix(strings.TrimSpace(line), "Token:"); ok {
			return strings.TrimSpace(tok), nil
		}
	}
	return "", fmt.Errorf("spire-server token generate: no token in %q", out)
}

// Entry is a registration entry.
type Entry struct {
	ID, Parent spiffeid.ID
	// Selectors are "type:value" (k8s:ns:shop, unix:path:/bin/x).
	Selectors []string
	// X509SVIDTTL is the lifetime of its SVIDs (the server's default if 0).
	X509SVIDTTL time.Duration
	// FederatesWith are trust domains whose bundles come with its SVIDs.
	FederatesWith []spiffeid.TrustDomain
}

// CreateEntry registers e and returns its entry ID.
func (s *Server) CreateEntry(ctx context.Context, e Entry) (string, error) {
	args := []string{"-parentID", e.Parent.String(), "-spiffeID", e.ID.String()}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	for _, td := range e.FederatesWith {
		args = append(args, "-federatesWith", td.IDString())
	}
	if e.X509SVIDTTL > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL/time.Second)))
	}
	out, err := s.cli(ctx, []string{"entry", "create"}, args...)
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if id, ok := strings.CutPrefix(strings.TrimSpace(line), "Entry ID"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(id), ":")), nil
		}
	}
	return "", fmt.Errorf("spire-server entry create: no entry id in %q", out)
}

// DeleteEntry deletes a registration entry.
func (s *Server) DeleteEntry(ctx context.Context, entryID string) error {
	_, err := s.cli(ctx, []string{"entry", "delete"}, "-entryID", entryID)
	return err
}

// Bundle returns the server's X.509 trust bundle.
func (s *Server) Bundle(ctx context.Context) (*x509bundle.Bundle, error) {
	out, err := s.cli(ctx, []string{"bundle", "show"}, "-format", "pem")
	if err != nil {
		return nil, err
	}
	return x509bundle.Parse(s.opts.TrustDomain, []byte(out))
}

// SetFederatedBundle stores b as the bundle of its (foreign) trust domain,
// as a federation relationship would.
func (s *Server) SetFederatedBundle(ctx context.Context, b *x509bundle.Bundle) error {
	pem, err := b.Marshal()
	if err != nil {
		return err
	}
	f := filepath.Join(s.opts.Dir, "federated-"+b.TrustDomain().Name()+".pem")
	if err := os.WriteFile(f, pem, 0o600); err != nil {
		return err
	}
	_, err = s.cli(ctx, []string{"bundle", "set"}, "-id", b.TrustDomain().IDString(), "-path", f, "-format", "pem")
	return err
}

// Close kills the server.
func (s *Server) Close() {
	if s.p != nil {
		s.p.kill()
	}
}

// AgentOptions configure a spire-agent.
type AgentOptions struct {
	// Bin is spire-agent (Binaries). Required.
	Bin string
	// Dir receives its config, data, sockets and log. Required.
	Dir string
	// Server is the spire-server to join. Required.
	Server *Server
	// JoinToken attests the agent on its first start (Server.JoinToken).
	// Required.
	JoinToken string
	// AuthorizedDelegates are SPIFFE IDs that may use the admin socket's
	// Delegated Identity API.
	AuthorizedDelegates []string
	// SyncInterval is how often the agent syncs with the server (its
	// default, 5s, if zero); it bounds how late a rotation or an entry
	// change arrives.
	SyncInterval time.Duration
}

// Agent is a spire-agent. It keeps its key and SVID on disk, so a restarted
// agent comes back as the same node.
type Agent struct {
	opts AgentOptions
	conf string

	mu sync.Mutex // guards p
	p  *proc
}

// StartAgent writes the agent's config, starts it and waits until its
// Workload API answers.
func StartAgent(ctx context.Context, o AgentOptions) (*Agent, error) {
	if o.Bin == "" || o.Dir == "" || o.Server == nil || o.JoinToken == "" {
		return nil, errors.New("spire: agent needs Bin, Dir, Server and JoinToken")
	}
	for _, d := range []string{"data", "public", "admin"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	a := &Agent{opts: o, conf: filepath.Join(o.Dir, "agent.conf")}
	delegates := make([]string, len(o.AuthorizedDelegates))
	for i, d := range o.AuthorizedDelegates {
		delegates[i] = strconv.Quote(d)
	}
	experimental := ""
	if o.SyncInterval > 0 {
		experimental = fmt.Sprintf("  experimental {\n    sync_interval = \"%s\"\n  }\n", o.SyncInterval)
	}
	conf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = %d
  socket_path = %q
  admin_socket_path = %q
  trust_domain = %q
  insecure_bootstrap = true
  join_token = %q
  authorized_delegates = [%s]
%s}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "disk" {
    plugin_data {
      directory = %q
    }
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
    }
  }
}
`, filepath.Join(o.Dir, "data"), o.Server.port, a.SocketPath(), a.AdminSocketPath(), o.Server.opts.TrustDomain.Name(),
		o.JoinToken, strings.Join(delegates, ", "), experimental, filepath.Join(o.Dir, "data"))
	if err := os.WriteFile(a.conf, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	if err := a.Start(ctx); err != nil {
		return nil, err
	}
	return a, nil
}

// SocketPath is the agent's Workload API socket.
func (a *Agent) SocketPath() string { return filepath.Join(a.opts.Dir, "public", "api.sock") }

// AdminSocketPath is the agent's admin socket (Delegated Identity API).
func (a *Agent) AdminSocketPath() string { return filepath.Join(a.opts.Dir, "admin", "admin.sock") }

// Log is the path of the agent's log.
func (a *Agent) Log() string { return filepath.Join(a.opts.Dir, "spire-agent.log") }

// Start (re)starts the agent and waits until it is healthy.
func (a *Agent) Start(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.p != nil {
		return errors.New("spire: agent already running")
	}
	p, err := start("spire-agent", a.opts.Dir, a.opts.Bin, "run", "-config", a.conf)
	if err != nil {
		return err
	}
	if err := waitHealthy(ctx, p, a.opts.Bin, a.SocketPath()); err != nil {
		p.kill()
		return err
	}
	a.p = p
	return nil
}

// Stop kills the agent (SIGKILL: gone, not drained).
func (a *Agent) Stop() {
	a.mu.Lock()
	p := a.p
	a.p = nil
	a.mu.Unlock()
	if p != nil {
		p.kill()
	}
}

// Close is Stop.
func (a *Agent) Close() { a.Stop() }

// AgentID returns the SPIFFE ID a join token gives an agent.
func AgentID(td spiffeid.TrustDomain, token string) spiffeid.ID {
	id, _ := spiffeid.FromSegments(td, "spire", "agent", "join_token", token)
	return id
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
