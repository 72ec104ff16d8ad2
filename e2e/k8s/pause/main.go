// Command pause is the e2e cluster's sandbox ("pause") image: the first process of every pod,
// holding its namespaces until the runtime stops it. A static Go binary stands in for the C
// pause of the Kubernetes images, which cannot be pulled here (no registry).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	<-sigs
}
