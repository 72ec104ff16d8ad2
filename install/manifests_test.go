package install_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

const namespace = "meshless-system"

// kustomization is the part of kustomize's Kustomization that the base uses; decoding it strictly
// refuses any other field, so a new field is a deliberate change here too.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Namespace  string   `json:"namespace"`
	Resources  []string `json:"resources"`
	Labels     []struct {
		Pairs map[string]string `json:"pairs"`
	} `json:"labels"`
}

// objects is the base decoded: one typed object per kind and name.
type objects struct {
	namespaces []*corev1.Namespace
	sas        []*corev1.ServiceAccount
	roles      []*rbacv1.ClusterRole
	bindings   []*rbacv1.ClusterRoleBinding
	configMaps []*corev1.ConfigMap
	daemonSets []*appsv1.DaemonSet
	count      int
}

var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// decodeAll decodes every YAML document of data strictly (unknown or duplicate fields are errors)
// into its k8s.io/api type.
func decodeAll(t *testing.T, name string, data []byte, into *objects) {
	t.Helper()
	for i, doc := range docSep.Split(string(data), -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatalf("%s document %d: %v", name, i, err)
		}
		var obj any
		switch tm.APIVersion + "/" + tm.Kind {
		case "v1/Namespace":
			o := new(corev1.Namespace)
			into.namespaces, obj = append(into.namespaces, o), o
		case "v1/ServiceAccount":
			o := new(corev1.ServiceAccount)
			into.sas, obj = append(into.sas, o), o
		case "rbac.authorization.k8s.io/v1/ClusterRole":
			o := new(rbacv1.ClusterRole)
			into.roles, obj = append(into.roles, o), o
		case "rbac.authorization.k8s.io/v1/ClusterRoleBinding":
			o := new(rbacv1.ClusterRoleBinding)
			into.bindings, obj = append(into.bindings, o), o
		case "v1/ConfigMap":
			o := new(corev1.ConfigMap)
			into.configMaps, obj = append(into.configMaps, o), o
		case "apps/v1/DaemonSet":
			o := new(appsv1.DaemonSet)
			into.daemonSets, obj = append(into.daemonSets, o), o
		default:
			t.Fatalf("%s document %d: unexpected %s %s", name, i, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatalf("%s document %d (%s): %v", name, i, tm.Kind, err)
		}
		into.count++
	}
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func readBase(t *testing.T) (kustomization, *objects) {
	t.Helper()
	data, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	objs := new(objects)
	for _, r := range k.Resources {
		data, err := os.ReadFile(filepath.Clean(r))
		if err != nil {
			t.Fatalf("kustomization.yaml resource: %v", err)
		}
		decodeAll(t, r, data, objs)
	}
	return k, objs
}

func TestKustomization(t *testing.T) {
	k, objs := readBase(t)
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("kustomization.yaml is %s %s", k.APIVersion, k.Kind)
	}
	if k.Namespace != namespace {
		t.Errorf("kustomization namespace %q, want %q", k.Namespace, namespace)
	}
	// Every YAML file of the directory is a resource of the base (none forgotten).
	files, _ := filepath.Glob("*.yaml")
	for _, f := range files {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not listed in kustomization.yaml resources", f)
		}
	}
	if len(objs.namespaces) != 1 || objs.namespaces[0].Name != namespace {
		t.Errorf("want one Namespace %s", namespace)
	}
	if len(objs.sas) != 1 || objs.sas[0].Name != "meshless" || objs.sas[0].Namespace != namespace {
		t.Errorf("want one ServiceAccount %s/meshless", namespace)
	}
}

func TestRBAC(t *testing.T) {
	_, objs := readBase(t)
	if len(objs.roles) != 1 || len(objs.bindings) != 1 {
		t.Fatalf("want one ClusterRole and one ClusterRoleBinding, got %d and %d", len(objs.roles), len(objs.bindings))
	}
	role, binding := objs.roles[0], objs.bindings[0]
	verbs := func(group, resource string) []string {
		var v []string
		for _, r := range role.Rules {
			if slices.Contains(r.APIGroups, group) && slices.Contains(r.Resources, resource) {
				v = append(v, r.Verbs...)
			}
		}
		return v
	}
	for _, want := range []string{"get", "list", "watch", "patch"} {
		if !slices.Contains(verbs("", "pods"), want) {
			t.Errorf("ClusterRole lacks pods %s", want)
		}
	}
	if !slices.Contains(verbs("", "events"), "create") {
		t.Error("ClusterRole lacks events create")
	}
	// What a stopping pod reads to tell `kubectl delete -k` from a restart.
	if !slices.Contains(verbs("", "namespaces"), "get") || !slices.Contains(verbs("apps", "daemonsets"), "get") {
		t.Error("ClusterRole lacks namespaces get or daemonsets get")
	}
	for _, r := range role.Rules {
		for _, v := range r.Verbs {
			if v == "*" || slices.Contains([]string{"delete", "deletecollection", "update", "create"}, v) && slices.Contains(r.Resources, "pods") {
				t.Errorf("ClusterRole grants more than needed: %v on %v", v, r.Resources)
			}
		}
		if slices.Contains(r.Resources, "secrets") || slices.Contains(r.Resources, "*") {
			t.Errorf("ClusterRole grants %v", r.Resources)
		}
	}
	if binding.RoleRef.Kind != "ClusterRole" || binding.RoleRef.Name != role.Name {
		t.Errorf("ClusterRoleBinding refers to %s %s, want ClusterRole %s", binding.RoleRef.Kind, binding.RoleRef.Name, role.Name)
	}
	if len(binding.Subjects) != 1 || binding.Subjects[0].Kind != "ServiceAccount" ||
		binding.Subjects[0].Name != "meshless" || binding.Subjects[0].Namespace != namespace {
		t.Errorf("ClusterRoleBinding subjects %+v, want ServiceAccount %s/meshless", binding.Subjects, namespace)
	}
}

func TestConfigMap(t *testing.T) {
	_, objs := readBase(t)
	if len(objs.configMaps) != 1 || objs.configMaps[0].Name != "meshless-config" {
		t.Fatal("want one ConfigMap meshless-config")
	}
	d := objs.configMaps[0].Data
	for k, want := range map[string]string{"trust-domain": "cluster.local", "mode": "strict", "excluded-namespaces": "kube-system"} {
		if d[k] != want {
			t.Errorf("ConfigMap %s = %q, want %q", k, d[k], want)
		}
	}
	if d["mesh-cidrs"] == "" {
		t.Error("ConfigMap lacks mesh-cidrs")
	}
}

func TestDaemonSet(t *testing.T) {
	_, objs := readBase(t)
	if len(objs.daemonSets) != 1 {
		t.Fatalf("want one DaemonSet, got %d", len(objs.daemonSets))
	}
	ds := objs.daemonSets[0]
	spec := ds.Spec.Template.Spec
	if ds.Name != "meshless" || ds.Namespace != namespace {
		t.Errorf("DaemonSet %s/%s, want %s/meshless", ds.Namespace, ds.Name, namespace)
	}
	sel := ds.Spec.Selector.MatchLabels
	for k, v := range sel {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the template's labels", k, v)
		}
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork is not set")
	}
	if spec.HostPID {
		t.Error("hostPID is set: the netns are reached through /var/run/netns")
	}
	if spec.ServiceAccountName != "meshless" {
		t.Errorf("serviceAccountName %q", spec.ServiceAccountName)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v, want one operator: Exists", spec.Tolerations)
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil ||
		us.RollingUpdate.MaxUnavailable == nil || us.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("updateStrategy %+v, want RollingUpdate maxUnavailable 1", us)
	}

	containers := map[string]corev1.Container{}
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		containers[c.Name] = c
		if c.Image != "meshless/meshlessd:dev" || c.ImagePullPolicy != corev1.PullIfNotPresent {
			t.Errorf("%s: image %s pull %s", c.Name, c.Image, c.ImagePullPolicy)
		}
		sc := c.SecurityContext
		if sc == nil || sc.Privileged == nil || *sc.Privileged {
			t.Errorf("%s: privileged must be false", c.Name)
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: want cpu and memory requests and a memory limit", c.Name)
		}
	}
	if len(spec.InitContainers) != 1 || spec.InitContainers[0].Name != "install-cni" {
		t.Fatalf("want one init container install-cni")
	}
	install := spec.InitContainers[0]
	wantArgs(t, install, "install-cni", "--cni-bin-dir=/host/opt/cni/bin", "--cni-conf-dir=/host/etc/cni/net.d")
	if slices.Contains(install.Args, "--watch") {
		t.Error("the init container must be one-shot (no --watch)")
	}
	watch, ok := containers["install-cni-watch"]
	if !ok {
		t.Fatal("no install-cni-watch container")
	}
	wantArgs(t, watch, "install-cni", "--watch", "--cni-bin-dir=/host/opt/cni/bin", "--cni-conf-dir=/host/etc/cni/net.d", "--uninstall-on-delete")
	for _, c := range []corev1.Container{install, watch} {
		wantMount(t, spec, c, "/host/opt/cni/bin", "/opt/cni/bin", "")
		wantMount(t, spec, c, "/host/etc/cni/net.d", "/etc/cni/net.d", "")
	}

	d, ok := containers["meshlessd"]
	if !ok {
		t.Fatal("no meshlessd container")
	}
	wantArgs(t, d, "run", "--node-name=$(NODE_NAME)", "--ca-dir=/etc/meshless/ca", "--state-dir=/var/lib/meshless",
		"--socket=/var/run/meshless/cni.sock", "--health-addr=$(HOST_IP):15021", "--uninstall-on-delete",
		"--excluded-namespaces=$(MESHLESS_EXCLUDED_NAMESPACES)", "--cni-conf-dir=/host/etc/cni/net.d", "--cni-bin-dir=/host/opt/cni/bin")
	// Both containers that act on `kubectl delete -k` look up their own namespace.
	for _, c := range []corev1.Container{watch, d} {
		if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == "POD_NAMESPACE" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace"
		}) {
			t.Errorf("container %s: POD_NAMESPACE must come from metadata.namespace", c.Name)
		}
	}
	if slices.ContainsFunc(d.Args, func(a string) bool { return strings.HasPrefix(a, "--kubeconfig") }) {
		t.Error("meshlessd must use the in-cluster configuration")
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range d.Env {
		env[e.Name] = e
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Error("NODE_NAME must come from spec.nodeName")
	}
	if e := env["GOMEMLIMIT"]; e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Error("GOMEMLIMIT must come from the container's limits.memory")
	}
	if e := env["HOST_IP"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "status.hostIP" {
		t.Error("HOST_IP must come from status.hostIP")
	}
	// Every $(VAR) in the args is defined, or Kubernetes passes it through verbatim.
	for _, a := range d.Args {
		for _, m := range regexp.MustCompile(`\$\(([A-Z_]+)\)`).FindAllStringSubmatch(a, -1) {
			if _, ok := env[m[1]]; !ok {
				t.Errorf("arg %s: $(%s) is not in env", a, m[1])
			}
		}
	}
	for _, e := range env {
		if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil {
			if r.ConfigMapKeyRef.Name != "meshless-config" || objs.configMaps[0].Data[r.ConfigMapKeyRef.Key] == "" {
				t.Errorf("env %s refers to a missing ConfigMap key %s/%s", e.Name, r.ConfigMapKeyRef.Name, r.ConfigMapKeyRef.Key)
			}
		}
	}

	caps := d.SecurityContext.Capabilities
	if caps == nil || !slices.Equal(caps.Drop, []corev1.Capability{"ALL"}) {
		t.Error("meshlessd must drop ALL capabilities")
	} else if got := slices.Sorted(slices.Values(caps.Add)); !slices.Equal(got, []corev1.Capability{"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}) {
		t.Errorf("meshlessd capabilities %v, want NET_ADMIN NET_RAW SYS_ADMIN", got)
	}
	for _, c := range []corev1.Container{install, watch} {
		if c.SecurityContext.Capabilities == nil || len(c.SecurityContext.Capabilities.Add) != 0 {
			t.Errorf("%s needs no capability", c.Name)
		}
	}

	for path, probe := range map[string]*corev1.Probe{"/healthz": d.LivenessProbe, "/readyz": d.ReadinessProbe} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != path {
			t.Errorf("want an HTTP probe on %s", path)
			continue
		}
		if p := probe.HTTPGet.Port; p.IntValue() != 15021 && !slices.ContainsFunc(d.Ports, func(cp corev1.ContainerPort) bool {
			return cp.Name == p.String() && cp.ContainerPort == 15021
		}) {
			t.Errorf("probe %s on port %s, want the health port 15021", path, p.String())
		}
	}

	wantMount(t, spec, d, "/var/run/netns", "/var/run/netns", corev1.MountPropagationHostToContainer)
	wantMount(t, spec, d, "/var/run/meshless", "/var/run/meshless", "")
	wantMount(t, spec, d, "/var/lib/meshless", "/var/lib/meshless", "")
	wantMount(t, spec, d, "/host/opt/cni/bin", "/opt/cni/bin", "")
	wantMount(t, spec, d, "/host/etc/cni/net.d", "/etc/cni/net.d", "")
	wantMount(t, spec, d, "/run/xtables.lock", "/run/xtables.lock", "")
	ca := findMount(t, spec, d, "/etc/meshless/ca")
	if ca.Secret == nil || ca.Secret.SecretName != "meshless-ca" {
		t.Errorf("/etc/meshless/ca must come from the Secret meshless-ca")
	}
}

func wantArgs(t *testing.T, c corev1.Container, want ...string) {
	t.Helper()
	if len(c.Args) == 0 || c.Args[0] != want[0] {
		t.Errorf("%s: subcommand %v, want %s", c.Name, c.Args, want[0])
	}
	for _, w := range want[1:] {
		if !slices.Contains(c.Args, w) {
			t.Errorf("%s: args %v lack %s", c.Name, c.Args, w)
		}
	}
}

// findMount returns the volume mounted at mountPath in c.
func findMount(t *testing.T, spec corev1.PodSpec, c corev1.Container, mountPath string) corev1.Volume {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.MountPath != mountPath {
			continue
		}
		for _, v := range spec.Volumes {
			if v.Name == m.Name {
				return v
			}
		}
		t.Fatalf("%s: mount %s uses the undefined volume %s", c.Name, mountPath, m.Name)
	}
	t.Errorf("%s: nothing mounted at %s", c.Name, mountPath)
	return corev1.Volume{}
}

// wantMount checks that hostPath is mounted at mountPath in c (with the given propagation, if any).
func wantMount(t *testing.T, spec corev1.PodSpec, c corev1.Container, mountPath, hostPath string, prop corev1.MountPropagationMode) {
	t.Helper()
	v := findMount(t, spec, c, mountPath)
	if v.HostPath == nil || v.HostPath.Path != hostPath {
		t.Errorf("%s: %s is not the host's %s", c.Name, mountPath, hostPath)
	}
	if prop == "" {
		return
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath == mountPath && (m.MountPropagation == nil || *m.MountPropagation != prop) {
			t.Errorf("%s: %s wants mountPropagation %s", c.Name, mountPath, prop)
		}
	}
}

// The base rendered by kubectl kustomize (when kubectl is installed) holds the same objects, all
// namespaced ones in meshless-system, and decodes strictly too.
func TestKustomizeRender(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		t.Skip("kubectl is not installed")
	}
	out, err := exec.Command(kubectl, "kustomize", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl kustomize: %v\n%s", err, out)
	}
	_, base := readBase(t)
	rendered := new(objects)
	decodeAll(t, "kubectl kustomize", out, rendered)
	if rendered.count != base.count {
		t.Fatalf("rendered %d objects, the base has %d", rendered.count, base.count)
	}
	for _, o := range []metav1.ObjectMeta{rendered.sas[0].ObjectMeta, rendered.configMaps[0].ObjectMeta, rendered.daemonSets[0].ObjectMeta} {
		if o.Namespace != namespace {
			t.Errorf("%s rendered in namespace %q", o.Name, o.Namespace)
		}
	}
	if !bytes.Contains(out, []byte("app.kubernetes.io/part-of: meshless")) {
		t.Error("the kustomization's labels are not applied")
	}
}
