"""thin-provisioning-tools formats: XML, binary metadata, tool equivalents, pool <-> IR."""
