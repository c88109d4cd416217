package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// chart writes a one-template chart and returns its directory.
func chart(t *testing.T, helpers, tmpl string) string {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "templates"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{"_helpers.tpl": helpers, "a.yaml": tmpl} {
		if err := os.WriteFile(filepath.Join(dir, "templates", name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func run(t *testing.T, helpers, tmpl string, values map[string]interface{}) (string, error) {
	t.Helper()
	return render(chart(t, helpers, tmpl), map[string]interface{}{
		"Values":  values,
		"Chart":   map[string]interface{}{"Name": "c"},
		"Release": map[string]interface{}{"Name": "r"},
	})
}

func TestToYamlIsBlockStyleWithSortedKeys(t *testing.T) {
	v := map[string]interface{}{
		"requests": map[string]interface{}{"memory": "384Mi", "cpu": "500m"},
		"limits":   map[string]interface{}{"memory": "512Mi"},
		"list":     []interface{}{map[string]interface{}{"b": "x", "a": float64(1)}, "yes", []interface{}{float64(2)}},
		"empty":    map[string]interface{}{},
	}
	want := "empty: {}\nlimits:\n  memory: 512Mi\nlist:\n- a: 1\n  b: x\n- \"yes\"\n- - 2\nrequests:\n  cpu: 500m\n  memory: 384Mi"
	if got := strings.TrimSuffix(toYaml(v, 0), "\n"); got != want {
		t.Fatalf("toYaml:\n%s\nwant:\n%s", got, want)
	}
}

func TestScalarsThatYamlWouldReadOtherwiseAreQuoted(t *testing.T) {
	for in, want := range map[interface{}]string{
		"true": `"true"`, "1.5": `"1.5"`, "": `""`, "a b": `"a b"`, "-x": `"-x"`, "redis://h:1": `"redis://h:1"`,
		"plain-word_1.2/x": "plain-word_1.2/x", float64(100000): "100000", float64(0.5): "0.5", nil: "null", true: "true",
	} {
		if got := scalar(in); got != want {
			t.Errorf("scalar(%#v) = %s, want %s", in, got, want)
		}
	}
}

func TestHelmFunctions(t *testing.T) {
	helpers := `{{- define "h.env" -}}
- name: {{ .name }}
  value: {{ .v | quote }}
{{- end -}}`
	tmpl := `env:
  {{- include "h.env" (dict "name" "N" "v" .Values.n) | nindent 2 }}
sum: {{ add .Values.n 2 "3" }}
int: {{ .Values.big | int | quote }}
raw: {{ .Values.big }}
def: {{ default "d" .Values.empty }}
ind: |
{{ "a\nb" | indent 2 }}
rel: {{ .Release.Name }}-{{ .Chart.Name }}`
	out, err := run(t, helpers, tmpl, map[string]interface{}{"n": float64(5), "big": float64(1000000), "empty": ""})
	if err != nil {
		t.Fatal(err)
	}
	// Helm prints a large number read from YAML as a float (1e+06): the reason for `int`.
	want := "---\n# Source: c/templates/a.yaml\nenv:\n  - name: N\n    value: \"5\"\nsum: 10\nint: \"1000000\"\nraw: 1e+06\ndef: d\nind: |\n  a\n  b\nrel: r-c\n"
	if out != want {
		t.Fatalf("rendered:\n%s\nwant:\n%s", out, want)
	}
}

func TestFailAndRequiredStopTheRenderWithTheirMessage(t *testing.T) {
	_, err := run(t, "", `{{ if gt (int .Values.a) 1 }}{{ fail (printf "a (%d) too big" (int .Values.a)) }}{{ end }}`,
		map[string]interface{}{"a": float64(2)})
	if err == nil || err.Error() != "execution error: a (2) too big" {
		t.Fatalf("fail: %v", err)
	}
	_, err = run(t, "", `x: {{ required "x is required" .Values.x }}`, map[string]interface{}{"x": ""})
	if err == nil || !strings.Contains(err.Error(), "x is required") {
		t.Fatalf("required: %v", err)
	}
	// A value the chart names but the values lack is an error, not an empty string.
	_, err = run(t, "", `x: {{ .Values.nope }}`, map[string]interface{}{})
	if err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("missing key: %v", err)
	}
}
