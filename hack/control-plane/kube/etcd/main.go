// Command etcd is etcd's server (go.etcd.io/etcd/server/v3/etcdmain), built at the version
// k8s.io/kubernetes pins, so that it shares the control plane's dependency graph.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
