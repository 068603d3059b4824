package hypervisor

import (
	"context"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// DomainEvent is one libvirt domain event, reduced to what hvpatch acts on.
type DomainEvent struct {
	Name, UUID string
	// Kind: "defined", "undefined", "started", "suspended", "resumed",
	// "stopped", "shutdown", "pmsuspended", "crashed" (lifecycle events),
	// "reboot" (the guest reset itself; same QEMU process, new kernel), or
	// "resync": the event stream was (re)established and events may have
	// been missed, so the receiver should look at every domain again.
	Kind   string
	Detail int
}

var lifecycleKinds = map[libvirt.DomainEventType]string{
	libvirt.DomainEventDefined:     "defined",
	libvirt.DomainEventUndefined:   "undefined",
	libvirt.DomainEventStarted:     "started",
	libvirt.DomainEventSuspended:   "suspended",
	libvirt.DomainEventResumed:     "resumed",
	libvirt.DomainEventStopped:     "stopped",
	libvirt.DomainEventShutdown:    "shutdown",
	libvirt.DomainEventPmsuspended: "pmsuspended",
	libvirt.DomainEventCrashed:     "crashed",
}

// Events streams lifecycle and reboot events of every domain until ctx ends,
// then closes the channel. Event subscriptions live on one libvirt
// connection; when it breaks (libvirtd restarted), Events subscribes again on
// a new one and sends a "resync" event first, as it does after the first
// subscription, since events in between are lost.
func (c *Conn) Events(ctx context.Context) <-chan DomainEvent {
	out := make(chan DomainEvent, 64)
	go func() {
		defer close(out)
		delay := 100 * time.Millisecond
		for ctx.Err() == nil {
			if err := c.streamEvents(ctx, out); err == nil {
				delay = 100 * time.Millisecond
			}
			select {
			case <-ctx.Done():
			case <-time.After(delay):
			}
			delay = min(2*delay, 5*time.Second)
		}
	}()
	return out
}

// streamEvents subscribes on the current connection and forwards events
// until the connection or a subscription ends.
func (c *Conn) streamEvents(ctx context.Context, out chan<- DomainEvent) error {
	subCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		lv        *libvirt.Libvirt
		lifecycle <-chan libvirt.DomainEventLifecycleMsg
		reboot    <-chan interface{}
	)
	err := c.call(ctx, "subscribing to domain events", callOpts{noRetry: true}, func(l *libvirt.Libvirt) error {
		var err error
		if lifecycle, err = l.LifecycleEvents(subCtx); err != nil {
			return err
		}
		reboot, err = l.SubscribeEvents(subCtx, libvirt.DomainEventIDReboot, libvirt.OptDomain{})
		lv = l
		return err
	})
	if err != nil {
		return err
	}
	send := func(ev DomainEvent) bool {
		select {
		case out <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}
	if !send(DomainEvent{Kind: "resync"}) {
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lv.Disconnected():
			return nil
		case m, ok := <-lifecycle:
			if !ok {
				return nil
			}
			kind, known := lifecycleKinds[libvirt.DomainEventType(m.Event)]
			if !known {
				continue
			}
			if !send(DomainEvent{Name: m.Dom.Name, UUID: formatUUID(m.Dom.UUID), Kind: kind, Detail: int(m.Detail)}) {
				return nil
			}
		case m, ok := <-reboot:
			if !ok {
				return nil
			}
			if r, isReboot := m.(*libvirt.DomainEventCallbackRebootMsg); isReboot {
				if !send(DomainEvent{Name: r.Msg.Dom.Name, UUID: formatUUID(r.Msg.Dom.UUID), Kind: "reboot"}) {
					return nil
				}
			}
		}
	}
}
