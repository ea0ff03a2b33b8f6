"""The control socket: how other processes run ops on a pool that a ``thinpool serve`` process holds.

While a pool is served, the serving process holds its exclusive lock; other commands reach it through
``<pool>/control.sock``, one JSON request line and one JSON reply line per connection.

* :mod:`thinpool.control.protocol` -- the wire format; errors rebuilt as the same
  :mod:`thinpool.errors` class by name;
* :mod:`thinpool.control.args` -- type checks of a request's arguments against the op's signature;
* :mod:`thinpool.control.client` -- connect to a serving process and call an op, with timeouts;
* :mod:`thinpool.control.server` -- :class:`~thinpool.control.server.ControlServer`, which answers
  requests with an op table its caller gives it.

Nothing is imported here: the client is on the start-up path of every CLI command.
"""
