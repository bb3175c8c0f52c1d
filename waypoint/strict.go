package waypoint

import (
	"fmt"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// allowed lists, per message type, the fields the waypoint implements (or
// that do not change behaviour). A message type listed here with a field set
// outside its list is refused, naming the field's path; message types not
// listed (Duration, CidrRange, Struct, Address, ...) are leaves taken whole.
// typed_config (Any) payloads are unpacked and checked where they are used.
var allowed = map[protoreflect.FullName][]string{
	// LDS
	"envoy.config.listener.v3.Listener":         {"name", "address", "filter_chains", "traffic_direction"},
	"envoy.config.listener.v3.FilterChain":      {"name", "filter_chain_match", "filters", "metadata"},
	"envoy.config.listener.v3.FilterChainMatch": {"prefix_ranges", "destination_port"},
	"envoy.config.listener.v3.Filter":           {"name", "typed_config"},
	"envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": {
		"stat_prefix", "rds", "http_filters", "common_http_protocol_options", "max_request_headers_kb",
		"stream_idle_timeout", "request_timeout", "codec_type"},
	"envoy.extensions.filters.network.http_connection_manager.v3.Rds":        {"config_source", "route_config_name"},
	"envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter": {"name", "typed_config"},
	"envoy.config.core.v3.HttpProtocolOptions":                               {"idle_timeout", "max_requests_per_connection"},
	"envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy":                 {"stat_prefix", "cluster", "idle_timeout"},
	"envoy.extensions.filters.http.router.v3.Router":                         {},
	// RBAC (HTTP and network)
	"envoy.extensions.filters.http.rbac.v3.RBAC":    {"rules", "shadow_rules", "rules_stat_prefix", "shadow_rules_stat_prefix"},
	"envoy.extensions.filters.network.rbac.v3.RBAC": {"rules", "shadow_rules", "stat_prefix", "shadow_rules_stat_prefix"},
	"envoy.config.rbac.v3.RBAC":                     {"action", "policies"},
	"envoy.config.rbac.v3.Policy":                   {"permissions", "principals"},
	"envoy.config.rbac.v3.Permission":               {"any", "and_rules", "or_rules", "not_rule", "header", "url_path", "destination_port"},
	"envoy.config.rbac.v3.Permission.Set":           {"rules"},
	"envoy.config.rbac.v3.Principal":                {"any", "and_ids", "or_ids", "not_id", "authenticated", "header"},
	"envoy.config.rbac.v3.Principal.Set":            {"ids"},
	"envoy.config.rbac.v3.Principal.Authenticated":  {"principal_name"},
	"envoy.type.matcher.v3.PathMatcher":             {"path"},
	"envoy.type.matcher.v3.StringMatcher":           {"exact", "prefix", "suffix", "safe_regex", "contains", "ignore_case"},
	"envoy.type.matcher.v3.RegexMatcher":            {"google_re2", "regex"},
	"envoy.config.route.v3.HeaderMatcher":           {"name", "string_match", "present_match", "invert_match", "treat_missing_header_as_empty"},
	// RDS
	"envoy.config.route.v3.RouteConfiguration": {"name", "virtual_hosts", "request_headers_to_add", "request_headers_to_remove",
		"response_headers_to_add", "response_headers_to_remove", "validate_clusters", "ignore_port_in_host_matching"},
	"envoy.config.route.v3.VirtualHost": {"name", "domains", "routes", "request_headers_to_add", "request_headers_to_remove",
		"response_headers_to_add", "response_headers_to_remove"},
	"envoy.config.route.v3.Route": {"name", "match", "route", "redirect", "direct_response", "metadata", "decorator",
		"request_headers_to_add", "request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove"},
	"envoy.config.route.v3.RouteMatch": {"prefix", "path", "safe_regex", "path_separated_prefix", "case_sensitive",
		"headers", "query_parameters", "grpc"},
	"envoy.config.route.v3.QueryParameterMatcher": {"name", "string_match", "present_match"},
	"envoy.config.route.v3.RouteAction": {"cluster", "weighted_clusters", "cluster_not_found_response_code", "timeout",
		"retry_policy", "request_mirror_policies", "prefix_rewrite", "regex_rewrite", "host_rewrite_literal"},
	"envoy.config.route.v3.WeightedCluster": {"clusters", "total_weight"},
	"envoy.config.route.v3.WeightedCluster.ClusterWeight": {"name", "weight", "request_headers_to_add",
		"request_headers_to_remove", "response_headers_to_add", "response_headers_to_remove"},
	"envoy.config.route.v3.RetryPolicy": {"retry_on", "num_retries", "per_try_timeout", "retriable_status_codes",
		"retry_back_off", "retry_host_predicate", "host_selection_retry_max_attempts"},
	"envoy.config.route.v3.RetryPolicy.RetryHostPredicate":  {"name", "typed_config"},
	"envoy.config.route.v3.RetryPolicy.RetryBackOff":        {"base_interval", "max_interval"},
	"envoy.config.route.v3.RouteAction.RequestMirrorPolicy": {"cluster", "runtime_fraction", "trace_sampled"},
	"envoy.config.route.v3.RedirectAction": {"scheme_redirect", "https_redirect", "host_redirect", "port_redirect",
		"path_redirect", "prefix_rewrite", "response_code", "strip_query"},
	"envoy.config.route.v3.DirectResponseAction": {"status", "body"},
	"envoy.config.core.v3.HeaderValueOption":     {"header", "append_action", "append", "keep_empty_value"},
	"envoy.config.core.v3.DataSource":            {"inline_string", "inline_bytes"},
	// CDS
	"envoy.config.cluster.v3.Cluster": {"name", "type", "eds_cluster_config", "connect_timeout", "lb_policy",
		"circuit_breakers", "outlier_detection", "typed_extension_protocol_options", "metadata", "alt_stat_name"},
	"envoy.config.cluster.v3.CircuitBreakers": {"thresholds"},
	"envoy.config.cluster.v3.CircuitBreakers.Thresholds": {"priority", "max_connections", "max_pending_requests",
		"max_requests", "max_retries", "track_remaining"},
	"envoy.config.cluster.v3.OutlierDetection": {"consecutive_5xx", "consecutive_gateway_failure", "enforcing_consecutive_5xx",
		"enforcing_consecutive_gateway_failure", "interval", "base_ejection_time", "max_ejection_time",
		"max_ejection_percent", "enforcing_success_rate", "success_rate_minimum_hosts", "success_rate_request_volume",
		"success_rate_stdev_factor"},
	"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {"common_http_protocol_options", "explicit_http_config",
		"use_downstream_protocol_config"},
	"envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig":      {"http_protocol_options", "http2_protocol_options"},
	"envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig": {"http_protocol_options", "http2_protocol_options"},
	"envoy.config.core.v3.Http1ProtocolOptions":                                      {},
	"envoy.config.core.v3.Http2ProtocolOptions":                                      {"max_concurrent_streams", "initial_stream_window_size", "initial_connection_window_size"},
	// EDS
	"envoy.config.endpoint.v3.ClusterLoadAssignment": {"cluster_name", "endpoints"},
	"envoy.config.endpoint.v3.LocalityLbEndpoints":   {"locality", "lb_endpoints", "load_balancing_weight", "priority"},
	"envoy.config.endpoint.v3.LbEndpoint":            {"endpoint", "health_status", "load_balancing_weight", "metadata"},
	"envoy.config.endpoint.v3.Endpoint":              {"address", "hostname"},
}

var allowedSet = func() map[protoreflect.FullName]map[protoreflect.Name]bool {
	out := make(map[protoreflect.FullName]map[protoreflect.Name]bool, len(allowed))
	for msg, fields := range allowed {
		s := make(map[protoreflect.Name]bool, len(fields))
		for _, f := range fields {
			s[protoreflect.Name(f)] = true
		}
		out[msg] = s
	}
	return out
}()

// checkFields returns an error naming the first field set in m (or below
// it) that the waypoint does not implement. path is m's own path.
func checkFields(m protoreflect.Message, path string) error {
	set, listed := allowedSet[m.Descriptor().FullName()]
	if !listed {
		return nil
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		p := joinPath(path, string(fd.Name()))
		if !set[fd.Name()] {
			err = fmt.Errorf("%s: field not supported by the waypoint", p)
			return false
		}
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = checkFields(l.Get(i).Message(), fmt.Sprintf("%s[%d]", p, i))
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				err = checkFields(mv.Message(), fmt.Sprintf("%s[%q]", p, k.String()))
				return err == nil
			})
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
			err = checkFields(v.Message(), p)
		}
		return err == nil
	})
	return err
}

func joinPath(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

// fieldError is a config error at a field path.
func fieldError(path string, format string, args ...any) error {
	return fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...))
}

// trimPrefixFold reports whether s starts with prefix (ASCII case
// insensitively when fold) and returns the rest.
func trimPrefixFold(s, prefix string, fold bool) (string, bool) {
	if len(s) < len(prefix) {
		return s, false
	}
	if fold {
		if !strings.EqualFold(s[:len(prefix)], prefix) {
			return s, false
		}
	} else if s[:len(prefix)] != prefix {
		return s, false
	}
	return s[len(prefix):], true
}
