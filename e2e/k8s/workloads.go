package main

import "fmt"

const (
	pauseImageRef    = "docker.io/meshless-e2e/pause:dev"
	workloadImageRef = "docker.io/meshless-e2e/workload:dev"
	testapp          = "/usr/local/bin/meshless-testapp"
	// appNamespace holds the workloads; appPort is the servers' port, servicePort the Service's.
	appNamespace = "e2e"
	appPort      = 8080
	servicePort  = 80
)

// workloadsManifest: two Deployments with their own service accounts (backend serves, with HTTP
// liveness and readiness probes; frontend is a client to exec into), a ClusterIP Service in front
// of backend, and a Deployment of two pods that opt out of meshless.
func workloadsManifest() []byte {
	probes := fmt.Sprintf(`          readinessProbe:
            httpGet: {path: /ready, port: %[1]d}
            periodSeconds: 2
          livenessProbe:
            httpGet: {path: /live, port: %[1]d}
            periodSeconds: 2
            failureThreshold: 3
`, appPort)
	return fmt.Appendf(nil, `apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: frontend
  namespace: %[1]s
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: backend
  namespace: %[1]s
---
%[2]s---
apiVersion: v1
kind: Service
metadata:
  name: backend
  namespace: %[1]s
spec:
  selector: {app: backend}
  ports:
    - port: %[5]d
      targetPort: %[6]d
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: frontend
  namespace: %[1]s
spec:
  replicas: 1
  selector:
    matchLabels: {app: frontend}
  template:
    metadata:
      labels: {app: frontend}
    spec:
      serviceAccountName: frontend
      terminationGracePeriodSeconds: 2
      containers:
        - name: main
          image: %[4]s
          imagePullPolicy: Never
          command: [/bin/busybox, sleep, "1000000"]
---
%[3]s`, appNamespace,
		serverDeployment("backend", "backend", "", probes, 1),
		serverDeployment("plain", "default", `meshless.io/inject: "false"`, "", 2),
		workloadImageRef, servicePort, appPort)
}

// earlyManifest is a Deployment that runs before meshless is installed, with a service account
// of its own: meshlessd must adopt its pod without a restart.
func earlyManifest() []byte {
	return fmt.Appendf(nil, `apiVersion: v1
kind: Namespace
metadata:
  name: %[1]s
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: early
  namespace: %[1]s
---
%[2]s`, appNamespace, serverDeployment("early", "early", "", "", 1))
}

// afterManifest is a Deployment created after meshless is uninstalled.
func afterManifest() []byte {
	return []byte(serverDeployment("after", "default", "", "", 1))
}

// serverDeployment is a Deployment of replicas pods running meshless-testapp's server on
// appPort, under service account sa, with the pod annotations and container probes given (YAML,
// empty for none).
func serverDeployment(name, sa, annotations, probes string, replicas int) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[1]s
  namespace: %[6]s
spec:
  replicas: %[5]d
  selector:
    matchLabels: {app: %[1]s}
  template:
    metadata:
      labels: {app: %[1]s}
      annotations: {%[3]s}
    spec:
      serviceAccountName: %[2]s
      terminationGracePeriodSeconds: 2
      containers:
        - name: main
          image: %[7]s
          imagePullPolicy: Never
          command: [%[8]q, server, -listen, ":%[9]d"]
          ports:
            - containerPort: %[9]d
%[4]s`, name, sa, annotations, probes, replicas, appNamespace, workloadImageRef, testapp, appPort)
}
