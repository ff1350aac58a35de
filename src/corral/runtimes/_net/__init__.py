"""Egress for local sandboxes (issue 15): one sandbox's network namespace, veth, nftables table and egress
process. :mod:`.stack` is what runtimes call; :mod:`.netns`, :mod:`.nft`, :mod:`.egress` (with :mod:`.dns`,
:mod:`.sniff`, :mod:`.ledger`) are its parts, :mod:`.config` the settings they take."""
