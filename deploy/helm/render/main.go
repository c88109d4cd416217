// Command render renders the push Helm chart the way `helm template` does, with Go's own
// text/template engine (the one Helm uses) and a reimplementation of exactly the Helm and Sprig
// functions the chart calls. Helm itself is not packaged by Debian 12 and cannot be downloaded
// here; deploy/check.py runs this program (standard library only) and still runs the real
// `helm lint` / `helm template` when a helm binary is given with --helm.
//
//	go run . CHART_DIR < context.json
//
// context.json holds what Helm would have parsed from YAML (Go's standard library has no YAML
// parser, so deploy/check.py converts Chart.yaml and the merged values to JSON):
//
//	{"Values": {...}, "Chart": {"Name": "push", "Version": "0.1.0", ...},
//	 "Release": {"Name": "t", "Namespace": "default", "Service": "Helm"}}
//
// The output is `helm template`'s: each template under templates/ (files starting with `_`
// only define helpers) as `---\n# Source: CHART/templates/FILE` followed by its text. A `fail`
// or `required` prints its message on stderr and exits with status 1, as helm does.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/template"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: render CHART_DIR < context.json")
		os.Exit(2)
	}
	var ctx map[string]interface{}
	if err := json.NewDecoder(os.Stdin).Decode(&ctx); err != nil {
		fmt.Fprintln(os.Stderr, "render: context is not JSON:", err)
		os.Exit(2)
	}
	out, err := render(os.Args[1], ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	os.Stdout.WriteString(out)
}

// render executes every template of the chart with ctx as the root value.
func render(chartDir string, ctx map[string]interface{}) (string, error) {
	files, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	chartName := "chart"
	if c, ok := ctx["Chart"].(map[string]interface{}); ok {
		if n, ok := c["Name"].(string); ok {
			chartName = n
		}
	}
	t := template.New("chart")
	// Helm's strict mode: a missing map key is an error, not "<no value>".
	t.Option("missingkey=error")
	t.Funcs(funcs(t))
	for _, f := range files {
		text, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		name := chartName + "/templates/" + filepath.Base(f)
		if _, err := t.New(name).Parse(string(text)); err != nil {
			return "", err
		}
	}
	var out strings.Builder
	for _, f := range files {
		base := filepath.Base(f)
		if strings.HasPrefix(base, "_") || !(strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml")) {
			continue
		}
		name := chartName + "/templates/" + base
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, name, ctx); err != nil {
			return "", cleanError(err)
		}
		// Helm leaves out templates that render to nothing but whitespace.
		if strings.TrimSpace(buf.String()) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.TrimRight(buf.String(), "\n"))
	}
	return out.String(), nil
}

// failError carries the message of `fail` / `required`, shown without the template position
// prefix wrapped around it (helm prints "execution error at (FILE:LINE): MESSAGE").
type failError struct{ msg string }

func (e failError) Error() string { return e.msg }

func cleanError(err error) error {
	var f failError
	if errors.As(err, &f) {
		return fmt.Errorf("execution error: %s", f.msg)
	}
	return err
}

// funcs are the Helm (include, required, fail, toYaml) and Sprig (default, dict, quote, int,
// add, indent, nindent) functions the chart uses, with Helm's semantics.
func funcs(t *template.Template) template.FuncMap {
	return template.FuncMap{
		"include": func(name string, data interface{}) (string, error) {
			var buf bytes.Buffer
			if err := t.ExecuteTemplate(&buf, name, data); err != nil {
				return "", err
			}
			return buf.String(), nil
		},
		"required": func(msg string, v interface{}) (interface{}, error) {
			if v == nil || v == "" {
				return nil, failError{msg}
			}
			return v, nil
		},
		"fail": func(msg string) (string, error) { return "", failError{msg} },
		"toYaml": func(v interface{}) string {
			return strings.TrimSuffix(toYaml(v, 0), "\n")
		},
		"default": func(d interface{}, given ...interface{}) interface{} {
			if len(given) == 0 || empty(given[0]) {
				return d
			}
			return given[0]
		},
		"quote": func(vs ...interface{}) string {
			out := make([]string, 0, len(vs))
			for _, v := range vs {
				if v != nil {
					out = append(out, strconv.Quote(fmt.Sprint(v)))
				}
			}
			return strings.Join(out, " ")
		},
		"dict": func(kv ...interface{}) (map[string]interface{}, error) {
			if len(kv)%2 != 0 {
				return nil, errors.New("dict: needs key and value pairs")
			}
			m := make(map[string]interface{}, len(kv)/2)
			for i := 0; i < len(kv); i += 2 {
				m[fmt.Sprint(kv[i])] = kv[i+1]
			}
			return m, nil
		},
		"int": toInt,
		"add": func(vs ...interface{}) int64 {
			var sum int64
			for _, v := range vs {
				sum += int64(toInt(v))
			}
			return sum
		},
		"indent":  func(n int, s string) string { return indent(n, s) },
		"nindent": func(n int, s string) string { return "\n" + indent(n, s) },
	}
}

func indent(n int, s string) string {
	pad := strings.Repeat(" ", n)
	return pad + strings.ReplaceAll(s, "\n", "\n"+pad)
}

// toInt is Sprig's `int` (spf13/cast's ToInt): numbers truncate, strings parse, the rest is 0.
func toInt(v interface{}) int {
	switch x := v.(type) {
	case float64:
		return int(x)
	case int:
		return x
	case int64:
		return int(x)
	case bool:
		if x {
			return 1
		}
		return 0
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(x), 0, 0)
		if err != nil {
			return 0
		}
		return int(n)
	}
	return 0
}

// empty is Sprig's notion of an unset value for `default`.
func empty(v interface{}) bool {
	switch x := v.(type) {
	case nil:
		return true
	case string:
		return x == ""
	case bool:
		return !x
	case float64:
		return x == 0
	case int, int64:
		return toInt(x) == 0
	case map[string]interface{}:
		return len(x) == 0
	case []interface{}:
		return len(x) == 0
	}
	return false
}

// toYaml emits block-style YAML with sorted keys, as Helm's toYaml (sigs.k8s.io/yaml) does for
// the JSON-shaped values a chart holds.
func toYaml(v interface{}, level int) string {
	pad := strings.Repeat("  ", level)
	var b strings.Builder
	switch x := v.(type) {
	case map[string]interface{}:
		if len(x) == 0 {
			return "{}\n"
		}
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			b.WriteString(pad + scalar(k) + ":")
			writeChild(&b, x[k], level)
		}
	case []interface{}:
		if len(x) == 0 {
			return "[]\n"
		}
		for _, e := range x {
			// A sequence inside a mapping sits at the mapping's indentation, and a mapping in a
			// sequence starts on the dash's line, as sigs.k8s.io/yaml writes them.
			if nested(e) {
				b.WriteString(pad + "- " + strings.TrimPrefix(toYaml(e, level+1), pad+"  "))
				continue
			}
			b.WriteString(pad + "-")
			writeChild(&b, e, level)
		}
	default:
		return scalar(v) + "\n"
	}
	return b.String()
}

// nested tells a non-empty mapping or sequence from a scalar.
func nested(v interface{}) bool {
	switch x := v.(type) {
	case map[string]interface{}:
		return len(x) > 0
	case []interface{}:
		return len(x) > 0
	}
	return false
}

func writeChild(b *strings.Builder, v interface{}, level int) {
	switch x := v.(type) {
	case map[string]interface{}:
		if len(x) > 0 {
			b.WriteString("\n" + toYaml(x, level+1))
			return
		}
	case []interface{}:
		if len(x) > 0 {
			b.WriteString("\n" + toYaml(x, level))
			return
		}
	}
	b.WriteString(" " + toYaml(v, 0))
}

// scalar writes a plain scalar where YAML reads it back as the same string, else a
// double-quoted one (JSON string syntax is valid YAML).
func scalar(v interface{}) string {
	switch x := v.(type) {
	case nil:
		return "null"
	case bool:
		return strconv.FormatBool(x)
	case float64:
		if x == math.Trunc(x) && math.Abs(x) < 1e15 {
			return strconv.FormatInt(int64(x), 10)
		}
		return strconv.FormatFloat(x, 'g', -1, 64)
	case string:
		if plain(x) {
			return x
		}
		q, _ := json.Marshal(x)
		return string(q)
	}
	q, _ := json.Marshal(fmt.Sprint(v))
	return string(q)
}

func plain(s string) bool {
	if s == "" {
		return false
	}
	switch strings.ToLower(s) {
	case "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~":
		return false
	}
	if _, err := strconv.ParseFloat(s, 64); err == nil {
		return false
	}
	for i, r := range s {
		ok := r == '_' || r == '.' || r == '/' || r == '-' || (r >= '0' && r <= '9') ||
			(r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z')
		if !ok || (i == 0 && r == '-') {
			return false
		}
	}
	return true
}
