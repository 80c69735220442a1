"""Each tab's handlers, as module-level functions of (session, inputs): callable without a
running Blocks app (the tests call them directly), wired to the page by explorer.app.build_app."""
